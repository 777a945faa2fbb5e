"""``--dtype auto``: the precision a user expects on the device at hand.

float32 on CPU (bf16/fp16 matmuls there are emulated or slow, and the tests' references are
fp32). On an accelerator the checkpoint's own half precision when it was saved in one (its
author chose it), else bfloat16: a FLUX.1 transformer in float32 is ~48 GB and several times
slower, and bf16 keeps fp32's range so no model needs rescaling. The checkpoint's dtype is read
from the first safetensors header of its transformer (a few bytes; no weights load).
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

_SAFETENSORS_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


def checkpoint_dtype(model: str) -> str | None:
    """The floating dtype of a local diffusers checkpoint's transformer weights, or None when
    there is no local safetensors file to read (hub ids, .bin weights)."""
    root = Path(model)
    for sub in ("transformer", "."):
        directory = root / sub
        if not directory.is_dir():
            continue
        for path in sorted(directory.glob("*.safetensors")):
            try:
                with open(path, "rb") as f:
                    (length,) = struct.unpack("<Q", f.read(8))
                    header = json.loads(f.read(length))
            except (OSError, ValueError, struct.error):
                continue
            for name, entry in header.items():
                if name != "__metadata__" and isinstance(entry, dict):
                    found = _SAFETENSORS_DTYPES.get(entry.get("dtype"))
                    if found is not None:
                        return found
    return None


def accelerator_available() -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


def resolve_dtype_name(name: str, model: str, on_accelerator: bool | None = None) -> str:
    """``name`` itself unless it is ``auto`` (see the module docstring)."""
    if name != "auto":
        return name
    if on_accelerator is None:
        on_accelerator = accelerator_available()
    if not on_accelerator:
        return "float32"
    saved = checkpoint_dtype(model)
    return saved if saved in ("float16", "bfloat16") else "bfloat16"


def resolve_dtype(name: str, model: str, on_accelerator: bool | None = None):
    """The ``torch.dtype`` for ``--dtype name`` and ``--model model``."""
    import torch

    return getattr(torch, resolve_dtype_name(name, model, on_accelerator))
