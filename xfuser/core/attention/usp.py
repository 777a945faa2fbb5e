"""USP attention: Ulysses all-to-all over heads x Ring passing of K/V, through yunchang.

Inputs are this rank's tokens, shaped (batch, local_tokens, heads, head_dim). Queries and
keys/values may have different token counts (FastCache computes queries for motion tokens
only while attending to every token); across ranks each of them must have equal counts for
the Ulysses exchange, which callers guarantee (see FastCache's padding).

Under ``--use_torch_compile`` :func:`usp_attention` stays outside the compiled graphs: yunchang's
all-to-all and ring P2P are collectives (with our timeout), and its Python-side bookkeeping
would otherwise guard and recompile the block on every call.
"""
from __future__ import annotations

import torch

from xfuser.core.attention.kernels import install_cpu_flash_kernel, kernel_name, select_attn_type
from xfuser.logger import init_logger

logger = init_logger(__name__)

_layers: dict = {}
#: ``--attention_backend`` in force; "auto" until :func:`set_attention_backend` is called
_backend = "auto"
_announced: set[str] = set()
#: bytes this rank sent inside USP attention (yunchang's collectives bypass our coordinators,
#: so they are counted here from the tensor sizes and group sizes)
comm_bytes = {"ulysses": 0, "ring": 0}


def _size(group) -> int:
    import torch.distributed as dist

    return dist.get_world_size(group) if group is not None else 1


def _count(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    from yunchang.globals import PROCESS_GROUP

    u, r = _size(PROCESS_GROUP.ULYSSES_PG), _size(PROCESS_GROUP.RING_PG)
    size = lambda t: t.numel() * t.element_size()  # noqa: E731
    # Ulysses: q, k, v and the output each keep 1/u locally and send the rest
    comm_bytes["ulysses"] += int((size(query) * 2 + size(key) + size(value)) * (u - 1) / u)
    # Ring (basic): r - 1 hops of this rank's k and v (after the Ulysses exchange: same bytes)
    comm_bytes["ring"] += (size(key) + size(value)) * (r - 1)


def reset_comm_bytes() -> None:
    comm_bytes.update(ulysses=0, ring=0)


def _announce(backend: str, attn_type, device: torch.device) -> str:
    """Log the kernel once per process: every rank and every runner built in it would repeat it."""
    name = kernel_name(attn_type, device)
    message = f"USP attention: {name} ({backend} on {device.type})"
    if message not in _announced:
        _announced.add(message)
        logger.info(message)
    return name


def set_attention_backend(
    backend: str, device: torch.device | str, ring_degree: int = 1, dtype: torch.dtype | None = None
) -> str:
    """Choose the USP kernel for ``backend`` (one of ``ATTENTION_BACKENDS``) and return its short name.

    Validates now (``ConfigError`` naming ``--attention_backend``) so a missing flash-attn or a
    wrong device fails before the first denoising step; cached layers are dropped when the
    choice changes because each one is bound to its kernel.
    """
    global _backend
    device = torch.device(device)
    attn_type = select_attn_type(backend, device, ring_degree, dtype)
    if backend != _backend:
        _layers.clear()
        _backend = backend
    return _announce(backend, attn_type, device)


def _layer(device: torch.device, dtype: torch.dtype):
    from yunchang import LongContextAttention
    from yunchang.globals import PROCESS_GROUP

    key = (id(PROCESS_GROUP.ULYSSES_PG), id(PROCESS_GROUP.RING_PG), device.type, dtype == torch.float32)
    layer = _layers.get(key)
    if layer is None:
        # re-checked per device and with the live ring size: tensors may sit elsewhere than the
        # device set_attention_backend was told about, and callers may never have called it
        attn_type = select_attn_type(_backend, device, _size(PROCESS_GROUP.RING_PG), dtype)
        install_cpu_flash_kernel()
        layer = LongContextAttention(attn_type=attn_type)
        _announce(_backend, attn_type, device)
        _layers.clear()  # groups changed: old layers hold dead process groups
        _layers[key] = layer
    return layer


@torch.compiler.disable
def usp_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Full (non-causal) attention of local queries over the keys/values of every SP rank."""
    dtype = query.dtype
    if query.device.type == "cpu" and dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"USP attention on CPU needs float32/bf16/fp16, got {dtype}")
    _count(query, key, value)
    return _layer(query.device, dtype)(query, key, value, softmax_scale=scale, causal=False)


def reset_usp_layers() -> None:
    """Drop cached layers (called on teardown: they reference process groups)."""
    _layers.clear()
