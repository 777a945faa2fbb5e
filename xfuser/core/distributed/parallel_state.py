"""Process groups of one run: world, dp, cfg, pp, sp (= ulysses x ring), and cfg_sp (the CFG x SP
peers of one stage, which share every cache decision).

Rank order (documented in docs/architecture.md): sequence parallel is fastest-varying, then
pipeline stage, then CFG branch, with data parallel outermost::

    rank = ((dp_idx * cfg + cfg_idx) * pp + pp_idx) * sp + sp_idx,
    sp_idx = ring_idx * ulysses + ulysses_idx          # ulysses "low", as yunchang expects

so an SP group is a contiguous block of ranks (intra-node NVLink for the heaviest all-to-all)
and the Ulysses/Ring split inside it matches ``yunchang.set_seq_parallel_pg(use_ulysses_low=True)``.

The backend is chosen by the machine (NCCL when CUDA is available, gloo otherwise). Timeouts
come in two phases. Start-up (the rendezvous, creating the groups, and the barrier that ends
:func:`initialize_model_parallel`) may wait ``startup_timeout_s`` for a peer that is still
loading its model. After that barrier every process group, the ones handed to yunchang
included, is switched to the steady-state ``timeout_s``, so the backend itself bounds the
collectives yunchang issues (gloo raises, the NCCL watchdog aborts), and the coordinators wait
on their own handles with the same value. :func:`extended_collective_timeout` lifts them back
for a phase known to be slow (e.g. the first, compiling, step). A run on one process needs no
``torch.distributed`` at all: every group is then a size-1 coordinator whose collectives are
no-ops.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from xfuser.core.distributed.group_coordinator import (
    DEFAULT_COLLECTIVE_TIMEOUT_S,
    DEFAULT_STARTUP_TIMEOUT_S,
    GroupCoordinator,
)
from xfuser.logger import init_logger

logger = init_logger(__name__)

GROUP_KINDS = ("dp", "cfg", "pp", "sp", "ulysses", "ring", "cfg_sp")


@dataclass(frozen=True)
class RankLayout:
    """Pure description of how global ranks map onto the parallel dimensions."""

    dp: int = 1
    cfg: int = 1
    pp: int = 1
    ulysses: int = 1
    ring: int = 1

    def __post_init__(self) -> None:
        for name in ("dp", "cfg", "pp", "ulysses", "ring"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel degree {name} must be >= 1, got {getattr(self, name)}")

    @property
    def sp(self) -> int:
        return self.ulysses * self.ring

    @property
    def world_size(self) -> int:
        return self.dp * self.cfg * self.pp * self.sp

    def rank_of(self, dp: int, cfg: int, pp: int, ring: int, ulysses: int) -> int:
        sp_idx = ring * self.ulysses + ulysses
        return ((dp * self.cfg + cfg) * self.pp + pp) * self.sp + sp_idx

    def coords(self, rank: int) -> dict[str, int]:
        """Indices of ``rank`` along every dimension (inverse of :meth:`rank_of`)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world of size {self.world_size}")
        sp_idx = rank % self.sp
        rest = rank // self.sp
        return {
            "ulysses": sp_idx % self.ulysses,
            "ring": sp_idx // self.ulysses,
            "sp": sp_idx,
            "pp": rest % self.pp,
            "cfg": (rest // self.pp) % self.cfg,
            "dp": rest // (self.pp * self.cfg),
        }

    def groups(self, kind: str) -> list[list[int]]:
        """Every group of ``kind``, each a list of global ranks in group order, in a
        deterministic order (all ranks must create groups in the same sequence)."""
        if kind not in GROUP_KINDS:
            raise ValueError(f"unknown group kind {kind!r}; expected one of {GROUP_KINDS}")
        dims = {"dp": self.dp, "cfg": self.cfg, "pp": self.pp, "ring": self.ring, "ulysses": self.ulysses}
        varying = {
            "dp": ("dp",),
            "cfg": ("cfg",),
            "pp": ("pp",),
            "sp": ("ring", "ulysses"),
            "ulysses": ("ulysses",),
            "ring": ("ring",),
            "cfg_sp": ("cfg", "ring", "ulysses"),
        }[kind]
        fixed = [d for d in ("dp", "cfg", "pp", "ring", "ulysses") if d not in varying]
        out = []
        for fixed_idx in itertools.product(*(range(dims[d]) for d in fixed)):
            base = dict(zip(fixed, fixed_idx))
            members = []
            for var_idx in itertools.product(*(range(dims[d]) for d in varying)):
                idx = {**base, **dict(zip(varying, var_idx))}
                members.append(self.rank_of(idx["dp"], idx["cfg"], idx["pp"], idx["ring"], idx["ulysses"]))
            out.append(members)
        return out


class _State:
    layout: RankLayout | None = None
    coordinators: dict[str, GroupCoordinator] = {}
    owns_process_group: bool = False
    timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S
    startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S
    #: every process group this module created (subgroups, and the default one if it owns it):
    #: the ones whose backend timeout it switches between start-up and steady state
    process_groups: list = []


_state = _State()


def default_backend() -> str:
    """NCCL when this process can see a GPU, gloo otherwise (overridable: XFUSER_DIST_BACKEND)."""
    forced = os.environ.get("XFUSER_DIST_BACKEND")
    if forced:
        return forced
    return "nccl" if torch.cuda.is_available() else "gloo"


def local_device() -> torch.device:
    """The device this rank computes on: its GPU under NCCL (by LOCAL_RANK), else the CPU."""
    if torch.cuda.is_available() and default_backend() == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def startup_timeout_for(timeout_s: float, startup_timeout_s: float | None = None) -> float:
    """The start-up wait: ``startup_timeout_s`` when given, else ``XFUSER_STARTUP_TIMEOUT`` (s)
    or :data:`DEFAULT_STARTUP_TIMEOUT_S`; never shorter than the steady-state ``timeout_s``."""
    if startup_timeout_s is None:
        startup_timeout_s = float(os.environ.get("XFUSER_STARTUP_TIMEOUT", DEFAULT_STARTUP_TIMEOUT_S))
    if not startup_timeout_s > 0:
        raise ValueError(f"the start-up timeout must be > 0 seconds, got {startup_timeout_s}")
    return max(float(startup_timeout_s), float(timeout_s))


def _check_nccl_error_handling() -> None:
    """NCCL collectives do not raise on a hang by themselves: the watchdog of each group ends
    the process once a collective has run past the group's timeout, unless async error handling
    was switched off (then a stuck peer holds the job for ever)."""
    mode = os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING", os.environ.get("NCCL_ASYNC_ERROR_HANDLING"))
    if mode is not None and mode.strip() == "0":
        logger.warning(
            "TORCH_NCCL_ASYNC_ERROR_HANDLING=0: NCCL will not end a stuck collective; the collective timeout only "
            "bounds waits on xfuser's own handles, not the collectives yunchang issues. Unset it (default 3) to "
            "have the watchdog end the process after the timeout."
        )


def init_distributed_environment(
    backend: str | None = None,
    timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S,
    startup_timeout_s: float | None = None,
) -> None:
    """Join the job torchrun (or a test harness) described in the environment.

    With no ``WORLD_SIZE`` (or ``WORLD_SIZE=1``) nothing is initialised: single-process runs do
    not need a process group. Safe to call twice. The rendezvous waits up to the start-up
    timeout (:func:`startup_timeout_for`) for every rank: a peer may still be loading its model.
    ``timeout_s`` is the steady-state timeout every group gets once
    :func:`initialize_model_parallel` has seen all ranks arrive.
    """
    _state.timeout_s = timeout_s
    _state.startup_timeout_s = startup_timeout_for(timeout_s, startup_timeout_s)
    if dist.is_initialized():
        return
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return
    backend = backend or default_backend()
    if backend == "nccl":
        torch.cuda.set_device(local_device())
        _check_nccl_error_handling()
    dist.init_process_group(
        backend=backend,
        rank=int(os.environ["RANK"]),
        world_size=world_size,
        timeout=datetime.timedelta(seconds=_state.startup_timeout_s),
    )
    _state.owns_process_group = True
    logger.debug("initialised %s process group: rank %d of %d", backend, dist.get_rank(), world_size)


def _world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def initialize_model_parallel(
    dp_degree: int = 1,
    cfg_degree: int = 1,
    pp_degree: int = 1,
    ulysses_degree: int = 1,
    ring_degree: int = 1,
    timeout_s: float | None = None,
    startup_timeout_s: float | None = None,
) -> RankLayout:
    """Create every group of the layout; each rank keeps coordinators for the groups it is in.

    Groups are created with the start-up timeout and the function ends with a barrier of all
    ranks under it; then every group (yunchang's included) gets the steady-state ``timeout_s``
    (default: the one given to :func:`init_distributed_environment`).
    Raises ``ValueError`` when the product of degrees is not the world size.
    """
    layout = RankLayout(dp=dp_degree, cfg=cfg_degree, pp=pp_degree, ulysses=ulysses_degree, ring=ring_degree)
    rank, world_size = _world()
    if layout.world_size != world_size:
        raise ValueError(
            f"parallel degrees dp={dp_degree} x cfg={cfg_degree} x pp={pp_degree} x "
            f"ulysses={ulysses_degree} x ring={ring_degree} = {layout.world_size}, but the world "
            f"size is {world_size}; make the product equal to the number of processes"
        )
    if _state.layout is not None:
        raise RuntimeError("model parallel groups already initialised; call destroy_model_parallel() first")
    timeout_s = _state.timeout_s if timeout_s is None else timeout_s
    startup_s = max(_state.startup_timeout_s, timeout_s) if startup_timeout_s is None else startup_timeout_for(
        timeout_s, startup_timeout_s)
    _state.timeout_s, _state.startup_timeout_s = timeout_s, startup_s
    startup = datetime.timedelta(seconds=startup_s)
    device = local_device()
    coordinators: dict[str, GroupCoordinator] = {}
    process_groups = [dist.group.WORLD] if world_size > 1 and _state.owns_process_group else []
    world_ranks = list(range(world_size))
    coordinators["world"] = GroupCoordinator(
        "world", world_ranks, dist.group.WORLD if world_size > 1 else None, rank, timeout_s, device
    )
    for kind in GROUP_KINDS:
        # Yunchang needs real (possibly size-1) ulysses and ring groups whenever SP is on.
        need_real = layout.sp > 1 and kind in ("ulysses", "ring")
        for members in layout.groups(kind):
            pg = None
            if world_size > 1 and (len(members) > 1 or need_real):
                # every rank calls, same order; group_desc names the group in NCCL's watchdog messages.
                # The ring group gets the steady-state timeout now: on gloo a P2P wait without a
                # deadline (yunchang's ring waits so) keeps the timeout a group was created with.
                pg_timeout = datetime.timedelta(seconds=timeout_s) if kind == "ring" else startup
                pg = dist.new_group(members, timeout=pg_timeout, group_desc=kind)
                if rank in members:
                    process_groups.append(pg)
            if rank in members:
                coordinators[kind] = GroupCoordinator(kind, members, pg, rank, timeout_s, device)
    _state.layout = layout
    _state.coordinators = coordinators
    _state.process_groups = process_groups
    if layout.sp > 1:
        _set_yunchang_groups(coordinators["ulysses"].group, coordinators["ring"].group)
    # The init barrier: the last wait allowed the start-up timeout (a peer may still be
    # loading). Every collective after it is steady state, bounded by ``timeout_s``.
    world = coordinators["world"]
    world.timeout = startup
    try:
        world.barrier()
    finally:
        world.reset_counters()
        _apply_timeout(timeout_s)
    logger.debug("rank %d coordinates %s", rank, layout.coords(rank))
    return layout


def _apply_timeout(seconds: float) -> None:
    """Give every coordinator and every process group we created the timeout ``seconds``:
    the backend then bounds the collectives issued outside our coordinators (yunchang's)."""
    timeout = datetime.timedelta(seconds=seconds)
    for coordinator in _state.coordinators.values():
        coordinator.timeout = timeout
    for pg in _state.process_groups:
        dist.distributed_c10d._set_pg_timeout(timeout, pg)


def collective_timeout_s() -> float:
    """The steady-state collective timeout in force (seconds)."""
    return _state.timeout_s


@contextlib.contextmanager
def extended_collective_timeout(seconds: float | None = None) -> Iterator[None]:
    """Let every collective inside the block wait up to ``seconds`` (default: the start-up
    timeout), then restore the steady-state timeout: for a phase known to be slow on some
    ranks only, such as the first step under ``--use_torch_compile`` with PipeFusion, where a
    stage waits for the stages before it to compile. (On gloo it cannot lengthen yunchang's
    ring P2P waits, which keep the ring group's creation timeout; collectives and every wait of
    the coordinators follow it, and on NCCL everything does.)"""
    seconds = _state.startup_timeout_s if seconds is None else seconds
    steady = _state.timeout_s
    _apply_timeout(max(seconds, steady))
    try:
        yield
    finally:
        _apply_timeout(steady)


def _set_yunchang_groups(ulysses_pg, ring_pg) -> None:
    """Hand our SP subgroups to yunchang (same layout as its ``use_ulysses_low=True``)."""
    from yunchang.globals import PROCESS_GROUP

    PROCESS_GROUP.ULYSSES_PG = ulysses_pg
    PROCESS_GROUP.RING_PG = ring_pg


def model_parallel_is_initialized() -> bool:
    return _state.layout is not None


def get_layout() -> RankLayout:
    if _state.layout is None:
        raise RuntimeError("initialize_model_parallel() has not been called")
    return _state.layout


def _get(kind: str) -> GroupCoordinator:
    if _state.layout is None:
        raise RuntimeError("initialize_model_parallel() has not been called")
    return _state.coordinators[kind]


def get_world_group() -> GroupCoordinator:
    return _get("world")


def get_dp_group() -> GroupCoordinator:
    return _get("dp")


def get_cfg_group() -> GroupCoordinator:
    return _get("cfg")


def get_pp_group() -> GroupCoordinator:
    return _get("pp")


def get_sp_group() -> GroupCoordinator:
    return _get("sp")


def get_ulysses_group() -> GroupCoordinator:
    return _get("ulysses")


def get_ring_group() -> GroupCoordinator:
    return _get("ring")


def get_cfg_sp_group() -> GroupCoordinator:
    """CFG x SP peers of one pipeline stage: the ranks that share each block's forward, hence
    the sync group of cache decisions."""
    return _get("cfg_sp")


def all_coordinators() -> dict[str, GroupCoordinator]:
    return dict(_state.coordinators)


def destroy_model_parallel() -> None:
    """Forget the groups. Handles are dropped *before* the process group is destroyed:
    on gloo, destroying while sub-group handles are alive can abort the process at exit."""
    if _state.layout is not None and _state.layout.sp > 1:
        _set_yunchang_groups(None, None)
        from xfuser.core.attention.usp import reset_usp_layers

        reset_usp_layers()
    for coordinator in _state.coordinators.values():
        coordinator.group = None
    _state.coordinators = {}
    _state.process_groups = []
    _state.layout = None
    gc.collect()


def destroy_distributed_environment() -> None:
    """Tear everything down cleanly (idempotent)."""
    destroy_model_parallel()
    if dist.is_initialized() and _state.owns_process_group:
        dist.destroy_process_group()
        _state.owns_process_group = False
    gc.collect()
