"""Warnings for a request that runs but is unlikely to give what the user expects: a size far
from the model's native one (slow steps, out-of-distribution images) and prompt words the
tokenizer does not know (spelled letter by letter, as the embedded model does with any word
outside its shapes-and-colours vocabulary). Said once per process and message, before compute."""
from __future__ import annotations

import re
from typing import Any

from xfuser.logger import init_logger, warn_once
from xfuser.model_executor.pipelines.call_args import native_size

logger = init_logger(__name__)

#: a size this many times the native token count (or 1/this) is "far from native"
FAR_FACTOR = 4.0
_WORD = re.compile(r"[A-Za-z]{3,}")


def far_from_native(pipe, height: Any, width: Any) -> str | None:
    """The warning for ``height`` x ``width`` when its area is ``FAR_FACTOR`` times the model's
    native one or less than 1/``FAR_FACTOR`` of it, else None."""
    if getattr(getattr(getattr(pipe, "transformer", None), "config", None), "sample_size", None) is None:
        return None  # video DiTs' sample_height/width bound the rotary table rather than name a native size
    native = native_size(pipe)
    if native is None or not isinstance(height, int) or not isinstance(width, int):
        return None
    ratio = (height * width) / (native[0] * native[1])
    if 1 / FAR_FACTOR < ratio < FAR_FACTOR:
        return None
    return (f"--height/--width {height}x{width} is far from the model's native {native[0]}x{native[1]} "
            f"({ratio:.3g}x its image tokens): expect {'slow steps and ' if ratio > 1 else ''}images unlike its "
            "training data; pass --height/--width near the native size unless this is intended")


def unknown_words(tokenizer, prompt: str) -> list[str]:
    """Words of ``prompt`` (3+ letters) that ``tokenizer`` can only spell one character at a time."""
    if tokenizer is None or not hasattr(tokenizer, "tokenize"):
        return []
    out = []
    for word in dict.fromkeys(_WORD.findall(prompt)):
        pieces = [p.lstrip("▁Ġ#") for p in tokenizer.tokenize(word)]
        if all(len(p) <= 1 for p in pieces):
            out.append(word)
    return out


def _prompts(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, str)]
    return []


def warn_unusual_inputs(pipe, kwargs: dict[str, Any]) -> None:
    """Log the warnings that apply to ``pipe(**kwargs)`` (each once per process)."""
    message = far_from_native(pipe, kwargs.get("height"), kwargs.get("width"))
    if message:
        warn_once(logger, "%s", message)
    tokenizer = getattr(pipe, "tokenizer", None)
    for prompt in _prompts(kwargs.get("prompt")):
        words = unknown_words(tokenizer, prompt)
        if words:
            warn_once(logger, "prompt %r: %s not in the tokenizer's vocabulary (spelled letter by letter), so the "
                      "model cannot follow %s%s", prompt, ", ".join(repr(w) for w in words),
                      "them" if len(words) > 1 else "it", _known_captions(pipe))


def _known_captions(pipe) -> str:
    """Where to see captions the model knows: its calibration prompts, when it ships them."""
    from pathlib import Path

    from xfuser.model_executor.cache.calibrate import PROMPTS_FILE

    root = getattr(pipe, "name_or_path", None) or getattr(pipe, "config", {}).get("_name_or_path")
    if not root or not (Path(root) / PROMPTS_FILE).is_file():
        return ""
    return f"; {Path(root) / PROMPTS_FILE} lists captions it was trained on"
