"""xDiT-style pipeline classes: ``xFuserPixArtSigmaPipeline.from_pretrained(model, engine_config=...)``.

Each class only names the diffusers pipeline it loads; loading returns an :class:`xDiTParallel`
runner (parallel groups, USP, CFG split and the cache installed), so there is one runner and
one denoising loop for every model. Adding a model is a three-line subclass naming its
diffusers class.
"""
from __future__ import annotations

from typing import Any

from xfuser.config.config import EngineConfig, InputConfig


class xFuserPipelineBase:  # noqa: N801
    diffusers_class: str = ""

    @classmethod
    def from_pretrained(
        cls, model: str | None = None, engine_config: EngineConfig | None = None, input_config: InputConfig | None = None, **kwargs: Any
    ):
        """Load ``model`` (default: ``engine_config.model_config.model``) and wrap it."""
        import diffusers

        from xfuser.parallel import xDiTParallel

        if engine_config is None:
            raise ValueError(f"{cls.__name__}.from_pretrained needs engine_config (xFuserArgs(...).create_config())")
        model = model or engine_config.model_config.model
        kwargs.setdefault("dtype", engine_config.model_config.torch_dtype)
        pipe = getattr(diffusers, cls.diffusers_class).from_pretrained(model, **kwargs)
        return xDiTParallel(pipe, engine_config, input_config or InputConfig())


class xFuserPixArtSigmaPipeline(xFuserPipelineBase):  # noqa: N801
    """Loads diffusers' ``PixArtSigmaPipeline`` under :class:`xDiTParallel`."""

    diffusers_class = "PixArtSigmaPipeline"


class xFuserPixArtAlphaPipeline(xFuserPipelineBase):  # noqa: N801
    """Loads diffusers' ``PixArtAlphaPipeline`` under :class:`xDiTParallel`."""

    diffusers_class = "PixArtAlphaPipeline"


class xFuserFluxPipeline(xFuserPipelineBase):  # noqa: N801
    """Loads diffusers' ``FluxPipeline`` under :class:`xDiTParallel`."""

    diffusers_class = "FluxPipeline"


class xFuserHunyuanDiTPipeline(xFuserPipelineBase):  # noqa: N801
    """Loads diffusers' ``HunyuanDiTPipeline`` under :class:`xDiTParallel`."""

    diffusers_class = "HunyuanDiTPipeline"


class xFuserCogVideoXPipeline(xFuserPipelineBase):  # noqa: N801
    """Loads diffusers' ``CogVideoXPipeline`` under :class:`xDiTParallel`."""

    diffusers_class = "CogVideoXPipeline"


class xFuserConsisIDPipeline(xFuserPipelineBase):  # noqa: N801
    """Loads diffusers' ``ConsisIDPipeline`` under :class:`xDiTParallel`."""

    diffusers_class = "ConsisIDPipeline"


#: xDiT class name -> the diffusers pipeline it loads
PIPELINES: dict[str, str] = {cls.__name__: cls.diffusers_class for cls in xFuserPipelineBase.__subclasses__()}

__all__ = ["PIPELINES", "xFuserPipelineBase", *PIPELINES]
