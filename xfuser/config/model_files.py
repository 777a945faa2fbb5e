"""Pre-load input checks against a checkpoint's small JSON files (``model_index.json``,
``tokenizer*/tokenizer_config.json``, ``text_encoder*/config.json``, ``transformer/config.json``,
``vae/config.json``) of a local model directory, or of a hub id already in the local Hugging Face
cache (never the network): ``create_config`` refuses a bad size or text length before any weight
loads. Torch-free, like the rest of the configuration layer; the checks of a loaded pipeline's
call arguments are in ``xfuser.model_executor.pipelines.input_checks``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from xfuser.config.config import ConfigError

#: pipelines whose resolution binning snaps any requested size to a table of valid sizes, and the
#: transformer sample sizes (latent pixels) that their binning tables exist for
BINNED_SAMPLE_SIZES = (32, 64, 128, 256)
BINNING_PIPELINES = ("PixArtAlphaPipeline", "PixArtSigmaPipeline", "HunyuanDiTPipeline")
#: tokenizers without a limit store a huge sentinel (transformers' VERY_LARGE_INTEGER)
_NO_LIMIT = 10**8


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


def sane_limit(value: Any) -> int | None:
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
    limit = sane_limit((_read_json(model, rel) or {}).get("model_max_length"))
    if limit is not None:
        return limit, rel
    rel = f"text_encoder{suffix}/config.json"
    encoder = _read_json(model, rel) or {}
    for key in ("max_position_embeddings", "n_positions"):
        limit = sane_limit(encoder.get(key))
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
    if name in BINNING_PIPELINES:
        if transformer.get("sample_size") in BINNED_SAMPLE_SIZES:
            return None  # binning on: any size is snapped to the aspect-ratio table
    channels = vae.get("block_out_channels")
    patch = transformer.get("patch_size") or 1
    if not isinstance(channels, (list, tuple)) or not channels or not isinstance(patch, int):
        return None
    scale = 2 ** (len(channels) - 1)
    pack = 2 if name.startswith("Flux") else 1
    return size_unit_of(scale, patch, pack)


def size_unit_of(scale: int, patch: int, pack: int) -> tuple[int, str]:
    how = f"VAE {scale}x x patch {patch}" + (" x Flux's 2x2 packing" if pack > 1 else "")
    return scale * patch * pack, how


def check_size(height: Any, width: Any, unit: int, how: str) -> None:
    for flag, value in (("--height", height), ("--width", width)):
        if isinstance(value, int) and value % unit:
            below = value // unit * unit
            nearest = f"{below} or {below + unit}" if below else f"{unit}"
            raise ConfigError(
                f"{flag} {value}: not divisible by {unit} ({how}), so the latent cannot be cut into whole "
                f"tokens; use a multiple of {unit}, e.g. {nearest}"
            )


def check_text_length(n: Any, limit: int, source: str) -> None:
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
            check_text_length(inputs.max_sequence_length, found[0], f"model_max_length in {found[1]}")
    if inputs.height is not None or inputs.width is not None:
        found = size_unit_from_files(model)
        if found is not None:
            check_size(inputs.height, inputs.width, *found)
