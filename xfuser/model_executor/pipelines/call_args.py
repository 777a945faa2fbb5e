"""Pipeline call arguments that work for small and large models alike.

PixArt pipelines snap the requested size to an aspect-ratio table chosen by the
transformer's ``sample_size`` and raise ``ValueError: Invalid sample size`` for any other
``sample_size`` (a model trained at 64 px has none). We switch binning off exactly then, so
hub models keep their behaviour and small models run at their native size.
"""
from __future__ import annotations

import inspect
from typing import Any

from xfuser.config.model_files import BINNED_SAMPLE_SIZES


def accepts(pipe, name: str) -> bool:
    return name in inspect.signature(type(pipe).__call__).parameters


def native_size(pipe) -> tuple[int, int] | None:
    """(height, width) in pixels the transformer was configured for, when it says: ``sample_size``
    (image DiTs) or ``sample_height``/``sample_width`` (CogVideoX, ConsisID) in latent pixels."""
    config = getattr(getattr(pipe, "transformer", None), "config", None)
    sample = getattr(config, "sample_size", None)
    scale = getattr(pipe, "vae_scale_factor", None)
    if sample is None:
        height, width = getattr(config, "sample_height", None), getattr(config, "sample_width", None)
        spatial = getattr(pipe, "vae_scale_factor_spatial", None)
        if isinstance(height, int) and isinstance(width, int) and isinstance(spatial, int):
            return height * spatial, width * spatial
        return None
    if scale is None:
        return None
    if isinstance(sample, (tuple, list)):
        return int(sample[0]) * scale, int(sample[1]) * scale
    return int(sample) * scale, int(sample) * scale


def binning_supported(pipe) -> bool:
    """False when the pipeline's resolution binning would raise for this transformer."""
    return getattr(pipe.transformer.config, "sample_size", None) in BINNED_SAMPLE_SIZES


def _caption_cleaning_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("bs4", "ftfy"))


MODEL_DEFAULTS_FILE = "xfuser_defaults.json"


def model_defaults(pipe) -> dict[str, Any]:
    """Call defaults a checkpoint ships beside ``model_index.json`` (e.g. the guidance scale a
    small model was tuned for), so every entry point uses them unless told otherwise."""
    import json
    from pathlib import Path

    root = getattr(pipe, "name_or_path", None) or getattr(getattr(pipe, "config", None), "_name_or_path", None)
    if not root:
        return {}
    path = Path(str(root)) / MODEL_DEFAULTS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def prepare_call_kwargs(pipe, height: int | None = None, width: int | None = None, **kwargs: Any) -> dict[str, Any]:
    """Fill height/width (the model's native size when not given), the checkpoint's shipped
    call defaults, and disable resolution binning where the pipeline would reject the size."""
    for key, value in model_defaults(pipe).items():
        if accepts(pipe, key):
            kwargs.setdefault(key, value)
    native = native_size(pipe)
    if height is None and native is not None:
        height = native[0]
    if width is None and native is not None:
        width = native[1]
    if height is not None:
        kwargs["height"] = height
    if width is not None:
        kwargs["width"] = width
    if accepts(pipe, "clean_caption") and "clean_caption" not in kwargs and not _caption_cleaning_available():
        kwargs["clean_caption"] = False  # what the pipeline falls back to anyway, minus a warning per call
    if accepts(pipe, "use_resolution_binning") and "use_resolution_binning" not in kwargs and height and width:
        if not binning_supported(pipe):
            kwargs["use_resolution_binning"] = False
    return kwargs


def _bind(pipe, args: tuple, kwargs: dict[str, Any] | None):
    signature = inspect.signature(type(pipe).__call__)
    try:
        return signature, signature.bind_partial(pipe, *args, **(kwargs or {}))
    except TypeError:
        return signature, None  # the pipeline itself will name the bad argument


def keyword_call(pipe, args: tuple = (), kwargs: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """``pipe(*args, **kwargs)`` spelled with keywords only (positional arguments bound to their
    names), or None when they do not bind (the pipeline itself will name the bad argument)."""
    signature, bound = _bind(pipe, args, kwargs)
    if bound is None:
        return None
    self_name = next(iter(signature.parameters))
    call: dict[str, Any] = {}
    for key, value in bound.arguments.items():
        kind = signature.parameters[key].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            call.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                return None  # extra positional arguments have no name to check
        elif key != self_name:
            call[key] = value
    return call


def _default(signature: inspect.Signature, name: str) -> Any:
    param = signature.parameters.get(name)
    return None if param is None or param.default is inspect.Parameter.empty else param.default


def call_default(pipe, name: str) -> Any:
    """The pipeline's default for call argument ``name`` (None when it has none)."""
    return _default(inspect.signature(type(pipe).__call__), name)


def requested_samples(pipe, args: tuple = (), kwargs: dict[str, Any] | None = None) -> int | None:
    """Images ``pipe(*args, **kwargs)`` generates: prompts (a string is one; else the rows of
    ``prompt_embeds``) times ``num_images_per_prompt``; None when the call does not say."""
    signature, bound = _bind(pipe, args, kwargs)
    if bound is None:
        return None
    prompt = bound.arguments.get("prompt")
    if isinstance(prompt, str):
        prompts = 1
    elif isinstance(prompt, (list, tuple)):
        prompts = len(prompt)
    elif getattr(bound.arguments.get("prompt_embeds"), "ndim", 0) >= 2:
        prompts = int(bound.arguments["prompt_embeds"].shape[0])
    else:
        return None
    per_prompt = bound.arguments.get("num_images_per_prompt") or _default(signature, "num_images_per_prompt") or 1
    return prompts * int(per_prompt)


def scheduled_steps(pipe, args: tuple = (), kwargs: dict[str, Any] | None = None) -> int | None:
    """The step count of ``pipe(*args, **kwargs)`` as the pipeline will schedule it: the length
    of a custom ``timesteps``/``sigmas`` list, else ``num_inference_steps`` whether passed by
    keyword or by position, else the pipeline's default (None when it has none)."""
    signature, bound = _bind(pipe, args, kwargs)
    if bound is None:
        return None
    for name in ("timesteps", "sigmas"):
        value = bound.arguments.get(name)
        if value is not None:
            return len(value)
    steps = bound.arguments.get("num_inference_steps")
    if steps is None:
        steps = _default(signature, "num_inference_steps")
    return None if steps is None else int(steps)


def schedule_length_of(pipe):
    """A callable giving the length of ``pipe``'s current schedule (its scheduler's timesteps,
    set by the pipeline before its loop), or None when it has no scheduler."""
    def length() -> int | None:
        timesteps = getattr(getattr(pipe, "scheduler", None), "timesteps", None)
        return None if timesteps is None else len(timesteps)

    return length
