"""USP attention: Ulysses all-to-all over heads x Ring passing of K/V, through yunchang.

Inputs are this rank's tokens, shaped (batch, local_tokens, heads, head_dim). Queries and
keys/values may have different token counts (FastCache computes queries for motion tokens
only while attending to every token); across ranks each of them must have equal counts for
the Ulysses exchange, which callers guarantee (see FastCache's padding).
"""
from __future__ import annotations

import torch

from xfuser.core.attention.kernels import attn_type_for, install_cpu_flash_kernel

_layers: dict = {}


def _layer(device: torch.device):
    from yunchang import LongContextAttention
    from yunchang.globals import PROCESS_GROUP

    key = (id(PROCESS_GROUP.ULYSSES_PG), id(PROCESS_GROUP.RING_PG), device.type)
    layer = _layers.get(key)
    if layer is None:
        install_cpu_flash_kernel()
        layer = LongContextAttention(attn_type=attn_type_for(device))
        _layers.clear()  # groups changed: old layers hold dead process groups
        _layers[key] = layer
    return layer


def usp_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Full (non-causal) attention of local queries over the keys/values of every SP rank."""
    dtype = query.dtype
    if query.device.type == "cpu" and dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"USP attention on CPU needs float32/bf16/fp16, got {dtype}")
    return _layer(query.device)(query, key, value, softmax_scale=scale, causal=False)


def reset_usp_layers() -> None:
    """Drop cached layers (called on teardown: they reference process groups)."""
    _layers.clear()
