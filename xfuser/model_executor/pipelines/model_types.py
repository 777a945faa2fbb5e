"""``--model_type`` names shared by the examples and benchmarks, and how each one loads.

A model type fixes the diffusers pipeline class, the checkpoint used when ``--model`` is not
given, and the size used for hub ids (768 px, as xDiT's examples; the embedded model and local
folders run at their native size).
Model types built in memory rather than loaded (``tiny-<family>``, the random tiny pipelines
of the test suite; ``pixart-sigma-random``, a random 12-block PixArt-Σ at 256 px for timing)
are registered from outside with :func:`register_model_type`: ``xfuser.testing.tiny_pipelines``
registers its own on import, so this library module never imports test code.
Every checkpoint goes through ``DiffusionPipeline.from_pretrained`` so a real hub folder and a
locally saved one take the same path.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from xfuser.config.config import ConfigError
from xfuser.config.defaults import default_model_path


@dataclass(frozen=True)
class ModelType:
    pipeline_class: str
    default_model: str | None  # None: the embedded model
    hub_size: int | None  # pixels, for a hub checkpoint; None = the checkpoint's native size
    video: bool = False


MODEL_TYPES: dict[str, ModelType] = {
    "pixart": ModelType("PixArtSigmaPipeline", None, None),
    "pixart-sigma": ModelType("PixArtSigmaPipeline", "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", 768),
    "pixart-alpha": ModelType("PixArtAlphaPipeline", "PixArt-alpha/PixArt-XL-2-1024-MS", 768),
    "flux": ModelType("FluxPipeline", "black-forest-labs/FLUX.1-schnell", 768),
    "hunyuandit": ModelType("HunyuanDiTPipeline", "Tencent-Hunyuan/HunyuanDiT-v1.2-Diffusers", 768),
    "cogvideox": ModelType("CogVideoXPipeline", "THUDM/CogVideoX1.5-5B", None, video=True),
    "consisid": ModelType("ConsisIDPipeline", "BestWishYsh/ConsisID-preview", None, video=True),
    # not in diffusers: our StepVideoPipeline (official transformer layout; see its module docstring)
    "stepvideo": ModelType("StepVideoPipeline", "stepfun-ai/stepvideo-t2v", None, video=True),
}


@dataclass(frozen=True)
class BuiltModelType:
    """A model type made in memory: ``build(dtype=..., **kwargs)`` returns the pipeline and
    ``call_defaults()`` the size/frames/guidance it runs at (no prompt, steps or generator)."""

    build: Callable[..., Any]
    call_defaults: Callable[[], dict[str, Any]] = field(default=dict)
    video: bool = False


_BUILT: dict[str, BuiltModelType] = {}


def register_model_type(name: str, build: Callable[..., Any], call_defaults: Callable[[], dict[str, Any]] = dict,
                        video: bool = False) -> None:
    """Make ``--model_type name`` build its pipeline with ``build`` (see :class:`BuiltModelType`)."""
    if name in MODEL_TYPES:
        raise ValueError(f"model type {name!r} is a checkpoint type; choose another name")
    _BUILT[name] = BuiltModelType(build, call_defaults, video)


def all_model_types() -> list[str]:
    return [*MODEL_TYPES, *_BUILT]


def video_model_types() -> list[str]:
    return [*(t for t, e in MODEL_TYPES.items() if e.video), *(t for t, e in _BUILT.items() if e.video)]


def pipeline_class(name: str):
    """A diffusers pipeline class by name, or one of ours that diffusers does not ship."""
    import diffusers

    if name == "StepVideoPipeline":
        from xfuser.model_executor.models.stepvideo.pipeline import StepVideoPipeline

        return StepVideoPipeline
    return getattr(diffusers, name)


def check_model_type(model_type: str) -> None:
    if model_type not in all_model_types():
        raise ConfigError(f"--model_type {model_type!r} is unknown; choose one of {all_model_types()}")


def resolve_model(model_type: str, model: str | None) -> str | None:
    """The checkpoint a run loads: ``--model`` if given, else the type's default."""
    check_model_type(model_type)
    if model is not None:
        return model
    if model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type].default_model or default_model_path()
    return None  # built in memory


def default_size(model_type: str, model: str | None) -> int | None:
    """Hub ids run at the type's hub size; the embedded model and local folders at their native size."""
    from pathlib import Path

    entry = MODEL_TYPES.get(model_type)
    resolved = resolve_model(model_type, model)
    if entry is None or entry.hub_size is None or resolved is None or Path(resolved).exists():
        return None
    return entry.hub_size


def unreachable_model_error(model: str, exc: BaseException, model_type: str | None = None) -> BaseException:
    """One line for a ``--model`` that cannot be loaded from anywhere: neither a directory nor
    an owner/name hub id, or a hub id not in the local cache while the hub is out of reach
    (which model, why, what to pass instead). Other failures are returned unchanged."""
    from pathlib import Path

    if Path(model).exists():
        return exc
    if model.count("/") != 1:
        return ConfigError(
            f"--model {model}: no such directory, and not a hub id (owner/name); give a diffusers checkpoint "
            "directory or a hub id"
        )
    text = str(exc).lower()
    if not ("cache" in text or "connect" in text):
        return exc
    tiny = f"tiny-{model_type}" if model_type and f"tiny-{model_type}" in _BUILT else "tiny-<family>"
    return ConfigError(
        f"--model {model}: not in the local Hugging Face cache and the hub cannot be reached; pass "
        f"--model DIR with a local copy of the checkpoint, the embedded trained model ({default_model_path()}), or "
        f"--model_type {tiny} (random weights: it runs the plumbing, its quality numbers mean nothing)"
    )


def call_defaults(model_type: str) -> dict[str, Any]:
    """Size/frames/guidance a built type runs at (a ``tiny-*`` type: what the test suite uses);
    {} for checkpoint types."""
    entry = _BUILT.get(model_type)
    return {} if entry is None else dict(entry.call_defaults())


def load_pipeline(model_type: str, model: str | None = None, dtype: torch.dtype = torch.float32, **build_kwargs: Any):
    """The pipeline for ``--model_type``/``--model`` (validated first: nothing loads on bad input)."""
    check_model_type(model_type)
    if model_type in _BUILT:
        return _BUILT[model_type].build(dtype=dtype, **build_kwargs)
    cls = pipeline_class(MODEL_TYPES[model_type].pipeline_class)
    resolved = resolve_model(model_type, model)
    try:
        return cls.from_pretrained(resolved, dtype=dtype)
    except OSError as exc:
        raise unreachable_model_error(resolved, exc, model_type) from exc
