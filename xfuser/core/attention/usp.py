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
#: bytes this rank sent inside USP attention (yunchang's collectives bypass our coordinators,
#: so they are counted here from the tensor sizes and group sizes)
comm_bytes = {"ulysses": 0, "ring": 0}


def _count(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    import torch.distributed as dist
    from yunchang.globals import PROCESS_GROUP

    u = dist.get_world_size(PROCESS_GROUP.ULYSSES_PG) if PROCESS_GROUP.ULYSSES_PG is not None else 1
    r = dist.get_world_size(PROCESS_GROUP.RING_PG) if PROCESS_GROUP.RING_PG is not None else 1
    size = lambda t: t.numel() * t.element_size()  # noqa: E731
    # Ulysses: q, k, v and the output each keep 1/u locally and send the rest
    comm_bytes["ulysses"] += int((size(query) * 2 + size(key) + size(value)) * (u - 1) / u)
    # Ring (basic): r - 1 hops of this rank's k and v (after the Ulysses exchange: same bytes)
    comm_bytes["ring"] += (size(key) + size(value)) * (r - 1)


def reset_comm_bytes() -> None:
    comm_bytes.update(ulysses=0, ring=0)


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
    _count(query, key, value)
    return _layer(query.device)(query, key, value, softmax_scale=scale, causal=False)


def reset_usp_layers() -> None:
    """Drop cached layers (called on teardown: they reference process groups)."""
    _layers.clear()
