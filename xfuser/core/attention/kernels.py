"""Attention kernels for USP through yunchang, on any device.

yunchang's ring attention merges per-block outputs with their log-sum-exp. Its torch path
(``AttnType.TORCH_FLASH``) calls ``aten._scaled_dot_product_flash_attention``, which exists
only for CUDA; its math path returns zeros for the LSE, which makes every ring merge silently
wrong. ``aten._scaled_dot_product_flash_attention_for_cpu`` returns the real LSE, so we route
CPU tensors to it and leave CUDA tensors on the original kernel. flash-attn is used on GPU
when installed (``AttnType.FA``).
"""
from __future__ import annotations

import torch

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


def attn_type_for(device: torch.device):
    """flash-attn on CUDA when installed, else torch's flash kernel (CPU via the shim above)."""
    from yunchang.globals import HAS_FLASH_ATTN
    from yunchang.kernels import AttnType

    if device.type == "cuda" and HAS_FLASH_ATTN:
        return AttnType.FA
    return AttnType.TORCH_FLASH
