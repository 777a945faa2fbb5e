"""USP attention: Ulysses all-to-all over heads x Ring passing of K/V, through yunchang.

Inputs are this rank's tokens, shaped (batch, local_tokens, heads, head_dim). Queries and
keys/values may have different token counts (FastCache computes queries for motion tokens
only while attending to every token); across ranks each of them must have equal counts for
the Ulysses exchange, which callers guarantee (see FastCache's padding).

Under ``--use_torch_compile`` :func:`usp_attention` stays outside the compiled graphs: yunchang's
all-to-all and ring P2P are collectives (with our timeout), and its Python-side bookkeeping
would otherwise guard and recompile the block on every call.

Yunchang calls ``torch.distributed`` itself on the groups we hand it, so those collectives
are bounded by the groups' own backend timeout (set by ``initialize_model_parallel``), and a
failure inside them comes back as the backend's raw error. :func:`usp_attention` turns it into
``CollectiveTimeout`` / ``PeerLost`` naming the group (``ulysses`` for the all-to-all, ``ring``
for the K/V passing, told apart by where in yunchang it was raised), the operation and the
peer ranks, like every other collective of the package.
"""
from __future__ import annotations

import os
import time

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
    layer = _layer(query.device, dtype)
    start = time.monotonic()
    try:
        return layer(query, key, value, softmax_scale=scale, causal=False)
    except RuntimeError as exc:  # gloo: RuntimeError / DistBackendError from yunchang's collectives
        error = _collective_failure(exc, time.monotonic() - start)
        if error is None:
            raise
        logger.error("%s", error)
        raise error from exc


def _yunchang_phase(exc: BaseException) -> str | None:
    """``"ulysses"`` when ``exc`` was raised inside yunchang's all-to-all, ``"ring"`` inside its
    ring P2P, ``None`` when the traceback passes through neither (innermost yunchang frame wins)."""
    phase = None
    tb = exc.__traceback__
    while tb is not None:
        path = tb.tb_frame.f_code.co_filename.replace(os.sep, "/")
        if "/yunchang/comm/" in path:
            phase = "ulysses"
        elif "/yunchang/ring/" in path:
            phase = "ring"
        tb = tb.tb_next
    return phase


def _collective_failure(exc: BaseException, elapsed_s: float):
    """The ``CollectiveTimeout``/``PeerLost`` for a backend error raised inside yunchang, or
    ``None`` when ``exc`` is no communication failure (then it propagates unchanged)."""
    import torch.distributed as dist
    from yunchang.globals import PROCESS_GROUP

    from xfuser.core.distributed import collective_error, collective_timeout_s

    if not dist.is_initialized():
        return None
    groups = {"ulysses": PROCESS_GROUP.ULYSSES_PG, "ring": PROCESS_GROUP.RING_PG}
    phase = _yunchang_phase(exc)
    if phase is None:  # only one of them communicates: it is that one
        live = [name for name, pg in groups.items() if pg is not None and _size(pg) > 1]
        phase = live[0] if len(live) == 1 else None
    me = dist.get_rank()
    if phase is None:
        name, op = "ulysses+ring", "USP attention (all_to_all / ring p2p)"
        ranks = sorted({r for pg in groups.values() if pg is not None for r in dist.get_process_group_ranks(pg)})
        peers = [r for r in ranks if r != me]
    else:
        name = phase
        ranks = dist.get_process_group_ranks(groups[phase])
        if phase == "ulysses":
            op, peers = "all_to_all (yunchang Ulysses)", [r for r in ranks if r != me]
        else:
            i, n = ranks.index(me), len(ranks)
            op = "ring p2p (yunchang K/V send/recv)"
            peers = sorted({ranks[(i - 1) % n], ranks[(i + 1) % n]} - {me})
    return collective_error(exc, group=name, op=op, ranks=ranks, peers=peers, global_rank=me,
                            elapsed_s=elapsed_s, timeout_s=collective_timeout_s())


def reset_usp_layers() -> None:
    """Drop cached layers (called on teardown: they reference process groups)."""
    _layers.clear()
