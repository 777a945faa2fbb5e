"""Checks of the call arguments a loaded pipeline is about to receive: one clear ``ConfigError``
naming the flag, before compute (``xDiTParallel`` at construction and at every call, and
``xFuserFastCachePipelineWrapper`` at every call). The pre-load checks against a checkpoint's
JSON files are ``xfuser.config.model_files``; nothing here imports torch at module level.
"""
from __future__ import annotations

import inspect
from typing import Any

from xfuser.config.config import ConfigError
from xfuser.config.model_files import check_size, check_text_length, sane_limit, size_unit_of


# --------------------------------------------------------------------------- loaded pipeline
def _signature(pipe) -> inspect.Signature:
    return inspect.signature(type(pipe).__call__)


def _effective(params, kwargs: dict[str, Any], name: str) -> Any:
    """The value ``name`` will have in the call: given, else the signature's default."""
    if name in kwargs:
        return kwargs[name]
    param = params.get(name)
    return None if param is None or param.default is inspect.Parameter.empty else param.default


def _has_text(value: Any) -> bool:
    if isinstance(value, str):
        return bool(value)
    if isinstance(value, (list, tuple)):
        return any(isinstance(v, str) and v for v in value)
    return False


def text_token_limit(pipe) -> tuple[int, str] | None:
    """(limit, source) for ``max_sequence_length`` of a loaded pipeline; see
    :func:`xfuser.config.model_files.text_token_limit_from_files` for which tokenizer counts."""
    name = type(pipe).__name__
    if name.startswith("Flux"):
        return 512, f"{name} accepts at most 512"
    suffix = "_2" if getattr(pipe, "tokenizer_2", None) is not None else ""
    tokenizer = getattr(pipe, f"tokenizer{suffix}", None)
    limit = sane_limit(getattr(tokenizer, "model_max_length", None))
    if limit is not None:
        return limit, f"{name}.tokenizer{suffix}.model_max_length"
    config = getattr(getattr(pipe, f"text_encoder{suffix}", None), "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        limit = sane_limit(getattr(config, key, None))
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
    return size_unit_of(scale, int(patch), pack)


def _count(value: Any) -> int | None:
    if isinstance(value, str):
        return 1
    if isinstance(value, (list, tuple)):
        return len(value)
    return None


def input_call_kwargs(pipe, inputs) -> dict[str, Any]:
    """The call arguments an :class:`InputConfig` asks of ``pipe`` for the whole request (every
    prompt, before any data-parallel split; no generator or output type): what
    :func:`check_call_inputs` checks before process groups exist, and what
    ``xDiTParallel.call_kwargs`` splits per replica. Arguments the pipeline does not take are
    kept, so that they are refused instead of dropped."""
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
            check_text_length(n_text, *found)

    guidance = _effective(params, kwargs, "guidance_scale")
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
            true_cfg = _effective(params, kwargs, "true_cfg_scale")
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
        binning = "use_resolution_binning" in params and _effective(params, kwargs, "use_resolution_binning")
        found = None if binning else size_unit(pipe)
        if found is not None:
            check_size(height, width, *found)
        _check_rotary_size(pipe, height, width)


def _check_rotary_size(pipe, height: Any, width: Any) -> None:
    """CogVideoX 1.5 (temporal patches + 3-D RoPE) slices its rotary table, built for the
    transformer's ``sample_height`` x ``sample_width`` latents, so a larger frame fails deep in
    diffusers with a tensor-size error; refuse it here with the largest size that works."""
    config = getattr(getattr(pipe, "transformer", None), "config", None)
    if (not type(pipe).__name__.startswith("CogVideoX") or config is None
            or not getattr(config, "use_rotary_positional_embeddings", False) or getattr(config, "patch_size_t", None) is None):
        return
    p, scale = int(config.patch_size), int(pipe.vae_scale_factor_spatial)
    for flag, value, sample, key in (("--height", height, config.sample_height, "sample_height"),
                                     ("--width", width, config.sample_width, "sample_width")):
        limit = int(sample) // p * p * scale
        if isinstance(value, int) and value > limit:
            raise ConfigError(
                f"{flag} {value}: {type(pipe.transformer).__name__} with patch_size_t (CogVideoX 1.5) slices its rotary "
                f"position table, built for {key}={sample} latents, so frames larger than {limit} px fail; use {flag} <= {limit}"
            )
