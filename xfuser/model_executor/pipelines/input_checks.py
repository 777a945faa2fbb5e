"""Input checks that need the model: one clear ``ConfigError`` naming the flag, before compute.

Two layers, both raising before anything heavy runs:

* :func:`check_model_files` reads only the checkpoint's small JSON files (``model_index.json``,
  ``tokenizer*/tokenizer_config.json``, ``transformer/config.json``, ``vae/config.json``) of a
  local model directory, or of a hub id already in the local Hugging Face cache (never the
  network), so ``create_config`` can refuse a bad size or text length before the weights load;
* :func:`check_call_inputs` checks the call arguments a loaded pipeline is about to receive
  (``xDiTParallel`` and ``xFuserFastCachePipelineWrapper`` call it before the pipeline runs).

Nothing here imports torch at module level: validating a config stays cheap.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

from xfuser.config.config import ConfigError

#: pipelines whose resolution binning snaps any requested size to a table of valid sizes
_BINNING_PIPELINES = ("PixArtAlphaPipeline", "PixArtSigmaPipeline", "HunyuanDiTPipeline")
#: tokenizers without a limit store a huge sentinel (transformers' VERY_LARGE_INTEGER)
_NO_LIMIT = 10**8


# --------------------------------------------------------------------------- model files
def _model_file(model: str, relpath: str) -> Path | None:
    """``relpath`` inside a local model directory, or inside the cached snapshot of a hub id
    (looked up in the local cache only); None when it is not on this machine."""
    if not model:
        return None
    root = Path(model)
    if root.is_dir():
        path = root / relpath
        return path if path.is_file() else None
    if root.exists() or model.count("/") != 1:  # a file, or not a hub id
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model, relpath)
    except Exception:  # noqa: BLE001 - a malformed id or an unreadable cache: nothing to check against
        return None
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


def _read_json(model: str, relpath: str) -> dict[str, Any] | None:
    path = _model_file(model, relpath)
    if path is None:
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # from_pretrained will report the broken file itself
    return data if isinstance(data, dict) else None


def _sane_limit(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = int(value)
    return value if 0 < value < _NO_LIMIT else None


def text_token_limit_from_files(model: str) -> tuple[int, str] | None:
    """(limit, file it comes from) for ``--max_sequence_length``: the ``model_max_length`` of the
    tokenizer that ``max_sequence_length`` pads to (``tokenizer_2`` when the pipeline has two, the
    T5 of Flux / HunyuanDiT; else ``tokenizer``), else the text encoder's position limit."""
    index = _read_json(model, "model_index.json")
    if index is None:
        return None
    suffix = "_2" if "tokenizer_2" in index else ""
    rel = f"tokenizer{suffix}/tokenizer_config.json"
    limit = _sane_limit((_read_json(model, rel) or {}).get("model_max_length"))
    if limit is not None:
        return limit, rel
    rel = f"text_encoder{suffix}/config.json"
    encoder = _read_json(model, rel) or {}
    for key in ("max_position_embeddings", "n_positions"):
        limit = _sane_limit(encoder.get(key))
        if limit is not None:
            return limit, rel
    return None


def size_unit_from_files(model: str) -> tuple[int, str] | None:
    """(pixels per image token along each side, how it is made up) from the checkpoint's
    configs: VAE spatial compression x transformer patch size (x 2 for Flux's 2x2 packing).
    None when the files do not say, or when the pipeline's resolution binning will snap the
    size anyway (PixArt / HunyuanDiT with a binned sample size)."""
    index = _read_json(model, "model_index.json")
    vae = _read_json(model, "vae/config.json")
    transformer = _read_json(model, "transformer/config.json")
    if index is None or vae is None or transformer is None:
        return None
    name = str(index.get("_class_name", ""))
    if name in _BINNING_PIPELINES:
        from xfuser.model_executor.pipelines.call_args import _BINNED_SAMPLE_SIZES

        if transformer.get("sample_size") in _BINNED_SAMPLE_SIZES:
            return None  # binning on: any size is snapped to the aspect-ratio table
    channels = vae.get("block_out_channels")
    patch = transformer.get("patch_size") or 1
    if not isinstance(channels, (list, tuple)) or not channels or not isinstance(patch, int):
        return None
    scale = 2 ** (len(channels) - 1)
    pack = 2 if name.startswith("Flux") else 1
    return _unit(scale, patch, pack)


def _unit(scale: int, patch: int, pack: int) -> tuple[int, str]:
    how = f"VAE {scale}x x patch {patch}" + (" x Flux's 2x2 packing" if pack > 1 else "")
    return scale * patch * pack, how


def _check_size(height: Any, width: Any, unit: int, how: str) -> None:
    for flag, value in (("--height", height), ("--width", width)):
        if isinstance(value, int) and value % unit:
            below = value // unit * unit
            nearest = f"{below} or {below + unit}" if below else f"{unit}"
            raise ConfigError(
                f"{flag} {value}: not divisible by {unit} ({how}), so the latent cannot be cut into whole "
                f"tokens; use a multiple of {unit}, e.g. {nearest}"
            )


def _check_text_length(n: Any, limit: int, source: str) -> None:
    if isinstance(n, int) and not isinstance(n, bool) and n > limit:
        raise ConfigError(
            f"--max_sequence_length {n}: exceeds the text encoder's limit of {limit} tokens ({source}); "
            f"use a value <= {limit}"
        )


def check_model_files(model: str, inputs) -> None:
    """Pre-load checks of ``inputs`` (an :class:`InputConfig`) against the checkpoint's JSON
    files; silent when the files are not on this machine (the call-time checks still run)."""
    if inputs.max_sequence_length is not None:
        found = text_token_limit_from_files(model)
        if found is not None:
            _check_text_length(inputs.max_sequence_length, found[0], f"model_max_length in {found[1]}")
    if inputs.height is not None or inputs.width is not None:
        found = size_unit_from_files(model)
        if found is not None:
            _check_size(inputs.height, inputs.width, *found)


# --------------------------------------------------------------------------- loaded pipeline
def _signature(pipe) -> inspect.Signature:
    return inspect.signature(type(pipe).__call__)


def _effective(pipe, kwargs: dict[str, Any], name: str) -> Any:
    if name in kwargs:
        return kwargs[name]
    param = _signature(pipe).parameters.get(name)
    return None if param is None or param.default is inspect.Parameter.empty else param.default


def _has_text(value: Any) -> bool:
    if isinstance(value, str):
        return bool(value)
    if isinstance(value, (list, tuple)):
        return any(isinstance(v, str) and v for v in value)
    return False


def text_token_limit(pipe) -> tuple[int, str] | None:
    """(limit, source) for ``max_sequence_length`` of a loaded pipeline; see
    :func:`text_token_limit_from_files` for which tokenizer counts."""
    name = type(pipe).__name__
    if name.startswith("Flux"):
        return 512, f"{name} accepts at most 512"
    suffix = "_2" if getattr(pipe, "tokenizer_2", None) is not None else ""
    tokenizer = getattr(pipe, f"tokenizer{suffix}", None)
    limit = _sane_limit(getattr(tokenizer, "model_max_length", None))
    if limit is not None:
        return limit, f"{name}.tokenizer{suffix}.model_max_length"
    config = getattr(getattr(pipe, f"text_encoder{suffix}", None), "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        limit = _sane_limit(getattr(config, key, None))
        if limit is not None:
            return limit, f"{name}.text_encoder{suffix}.config.{key}"
    return None


def size_unit(pipe) -> tuple[int, str] | None:
    """Pixels per image token along each side for a loaded pipeline (None: unknown)."""
    transformer = getattr(pipe, "transformer", None)
    scale = getattr(pipe, "vae_scale_factor_spatial", None) or getattr(pipe, "vae_scale_factor", None)
    if transformer is None or not isinstance(scale, int):
        return None
    patch = getattr(transformer.config, "patch_size", None) or 1
    if isinstance(patch, (tuple, list)):
        patch = patch[0]
    pack = 2 if type(pipe).__name__.startswith("Flux") else 1
    return _unit(scale, int(patch), pack)


def _count(value: Any) -> int | None:
    if isinstance(value, str):
        return 1
    if isinstance(value, (list, tuple)):
        return len(value)
    return None


def input_call_kwargs(pipe, inputs) -> dict[str, Any]:
    """The call arguments an :class:`InputConfig` asks of ``pipe`` for the whole request (every
    prompt, before any data-parallel split; no generator), for :func:`check_call_inputs` to
    check before process groups exist. Unlike ``xDiTParallel.call_kwargs`` it keeps arguments
    the pipeline does not take, so that they are refused instead of dropped."""
    from xfuser.model_executor.pipelines.call_args import prepare_call_kwargs

    kwargs = prepare_call_kwargs(pipe, inputs.height, inputs.width)
    kwargs.update(prompt=list(inputs.prompt), num_inference_steps=inputs.num_inference_steps)
    for key in ("guidance_scale", "max_sequence_length", "num_frames"):
        if getattr(inputs, key) is not None:
            kwargs[key] = getattr(inputs, key)
    if _has_text(inputs.negative_prompt):
        kwargs["negative_prompt"] = inputs.negative_prompt
    return kwargs


def check_call_inputs(pipe, kwargs: dict[str, Any]) -> None:
    """Refuse call arguments ``pipe(**kwargs)`` would fail on late, deep inside diffusers or the
    text encoder, or silently ignore; each message names the CLI flag and the fix."""
    name = type(pipe).__name__
    params = _signature(pipe).parameters
    if kwargs.get("num_frames") is not None and "num_frames" not in params:
        raise ConfigError(f"--num_frames: {name} generates images, not videos")  # xDiTParallel.call_kwargs' words
    n_text = kwargs.get("max_sequence_length")
    if n_text is not None:
        if "max_sequence_length" not in params:
            raise ConfigError(
                f"--max_sequence_length {n_text}: {name} does not take it (its text lengths are fixed by the "
                "model); drop the flag"
            )
        if isinstance(n_text, bool) or not isinstance(n_text, int) or n_text < 1:
            raise ConfigError(f"--max_sequence_length must be an integer >= 1, got {n_text!r}")
        found = text_token_limit(pipe)
        if found is not None:
            _check_text_length(n_text, *found)

    guidance = _effective(pipe, kwargs, "guidance_scale")
    if guidance is not None and not isinstance(guidance, bool) and isinstance(guidance, (int, float)) and guidance < 0:
        raise ConfigError(f"--guidance_scale must be >= 0, got {guidance}; use 0-1 for no guidance, > 1 for CFG")
    negative = kwargs.get("negative_prompt")
    if _has_text(negative) and "negative_prompt" not in params:
        raise ConfigError(f"--negative_prompt: {name} takes no negative prompt; drop --negative_prompt")
    if _has_text(negative):
        n_neg, n_pos = _count(negative), _count(kwargs.get("prompt"))
        if n_neg is not None and n_pos is not None and n_neg not in (1, n_pos):
            raise ConfigError(
                f"--negative_prompt gives {n_neg} prompts for {n_pos} --prompt values; give one negative prompt "
                "or one per prompt"
            )
        guidance_embedded = getattr(getattr(getattr(pipe, "transformer", None), "config", None), "guidance_embeds", False)
        if "true_cfg_scale" in params or guidance_embedded:
            true_cfg = _effective(pipe, kwargs, "true_cfg_scale")
            if true_cfg is None or true_cfg <= 1:
                raise ConfigError(
                    f"--negative_prompt is ignored by {name} unless true_cfg_scale > 1 (its --guidance_scale is "
                    "the distilled guidance input, not CFG); drop --negative_prompt, or pass true_cfg_scale > 1 "
                    "through the Python API"
                )
        elif guidance is not None and guidance <= 1:
            raise ConfigError(
                f"--negative_prompt is ignored when --guidance_scale is {guidance} (<= 1 turns classifier-free "
                "guidance off); raise --guidance_scale above 1 or drop --negative_prompt"
            )

    height, width = kwargs.get("height"), kwargs.get("width")
    if height is not None or width is not None:
        binning = "use_resolution_binning" in params and _effective(pipe, kwargs, "use_resolution_binning")
        found = None if binning else size_unit(pipe)
        if found is not None:
            _check_size(height, width, *found)
