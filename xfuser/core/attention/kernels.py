"""Attention kernels for USP through yunchang, on any device.

yunchang's ring attention merges per-block outputs with their log-sum-exp. Its torch path
(``AttnType.TORCH_FLASH``) calls ``aten._scaled_dot_product_flash_attention``, which exists
only for CUDA; its math path returns zeros for the LSE, which makes every ring merge silently
wrong. ``aten._scaled_dot_product_flash_attention_for_cpu`` returns the real LSE, so we route
CPU tensors to it and leave CUDA tensors on the original kernel. :func:`select_attn_type`
maps ``--attention_backend`` to one of the kernels that return a real LSE.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from xfuser.config.config import ATTENTION_BACKENDS, ConfigError

if TYPE_CHECKING:
    from yunchang.kernels import AttnType

_installed = False


def _device_aware_flash(original):
    def kernel(query, key, value, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if query.device.type == "cpu":
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                query, key, value, dropout_p, is_causal, scale=scale
            )
        return original(query, key, value, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kwargs)

    kernel.__xfuser_wrapped__ = original
    return kernel


def install_cpu_flash_kernel() -> None:
    """Make yunchang's TORCH_FLASH path work on CPU (idempotent)."""
    global _installed
    if _installed:
        return
    import yunchang.kernels.attention as yk

    if not hasattr(yk._scaled_dot_product_flash_attention, "__xfuser_wrapped__"):
        yk._scaled_dot_product_flash_attention = _device_aware_flash(yk._scaled_dot_product_flash_attention)
    _installed = True


# Kernels whose yunchang forward returns the true log-sum-exp. TORCH_MATH and TORCH_CUDNN
# return zeros there, so ring merges of their block outputs would be silently wrong.
_EXACT_LSE = frozenset({"FA", "TORCH_FLASH", "TORCH_EFFICIENT"})

_FLAG = "--attention_backend"


def has_exact_lse(attn_type: AttnType) -> bool:
    """Whether yunchang's forward for ``attn_type`` returns a real LSE (needed for ring > 1)."""
    return attn_type.name in _EXACT_LSE


def kernel_name(attn_type: AttnType, device: torch.device) -> str:
    """Short human name of the kernel ``attn_type`` runs on ``device`` (for logs and reports)."""
    if attn_type.name == "FA":
        return "flash-attn"
    if attn_type.name == "TORCH_FLASH":
        return "cpu-flash" if device.type == "cpu" else "sdpa-flash"
    if attn_type.name == "TORCH_EFFICIENT":
        return "sdpa-efficient"
    return attn_type.value


def select_attn_type(
    backend: str, device: torch.device | str, ring_degree: int = 1, dtype: torch.dtype | None = None
) -> AttnType:
    """The yunchang ``AttnType`` for ``backend`` on ``device``, or :class:`ConfigError`.

    Called before any compute so an impossible choice (flash-attn missing, ``cpu`` on a GPU,
    a device no kernel serves) fails with the flag and the fix instead of deep inside yunchang.
    On CPU every choice but ``flash_attn`` is torch's CPU flash kernel: it is what SDPA itself
    runs on CPU, and unlike SDPA's math path it returns the LSE that ring merges need.
    On CUDA both flash kernels take only fp16/bf16: float32 (``dtype``) goes to SDPA's
    memory-efficient kernel, which also returns a real LSE; ``flash_attn`` with it is refused.
    """
    from yunchang import globals as yg
    from yunchang.kernels import AttnType

    if backend not in ATTENTION_BACKENDS:
        raise ConfigError(f"{_FLAG} {backend!r} is unknown; choose one of {', '.join(ATTENTION_BACKENDS)}")
    if not isinstance(ring_degree, int) or ring_degree < 1:
        raise ConfigError(f"--ring_degree must be an integer >= 1, got {ring_degree!r}")
    kind = torch.device(device).type
    if backend == "flash_attn":
        if kind != "cuda":
            raise ConfigError(f"{_FLAG} flash_attn needs a CUDA device, got {kind}; use {_FLAG} cpu or auto")
        if not yg.HAS_FLASH_ATTN:
            raise ConfigError(f"{_FLAG} flash_attn: flash-attn is not installed; pip install flash-attn or use {_FLAG} sdpa")
        if dtype == torch.float32:
            raise ConfigError(f"{_FLAG} flash_attn needs float16/bfloat16, but --dtype is float32; use --dtype bfloat16 or {_FLAG} sdpa")
        attn_type = AttnType.FA
    elif backend == "cpu":
        if kind != "cpu":
            raise ConfigError(f"{_FLAG} cpu needs CPU tensors, but the device is {kind}; use {_FLAG} auto or sdpa")
        attn_type = AttnType.TORCH_FLASH
    elif kind not in ("cuda", "cpu"):
        raise ConfigError(f"{_FLAG} {backend}: USP attention has no kernel for {kind} devices; run on cuda or cpu")
    elif kind == "cuda" and dtype == torch.float32:
        attn_type = AttnType.TORCH_EFFICIENT
    elif backend == "auto" and kind == "cuda" and yg.HAS_FLASH_ATTN:
        attn_type = AttnType.FA
    else:  # sdpa, or auto without flash-attn / on CPU
        attn_type = AttnType.TORCH_FLASH
    if ring_degree > 1 and not has_exact_lse(attn_type):  # guards future additions to the table above
        raise ConfigError(f"{_FLAG} {backend}: {attn_type.value} returns no log-sum-exp, so ring_degree > 1 would be wrong")
    return attn_type
