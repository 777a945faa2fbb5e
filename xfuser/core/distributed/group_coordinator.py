"""One process group and every collective the runners need, each bounded by a timeout.

Why a wrapper: callers never touch ``torch.distributed`` directly, so (a) a group of size 1 is
a cheap no-op everywhere (single-process runs share the code path), (b) every collective is
issued asynchronously and waited on with a deadline, so a rank that disagrees raises
``CollectiveTimeout`` instead of hanging a cluster forever, and (c) bytes sent are counted
per group, which is how the benchmarks report communication volume.
"""
from __future__ import annotations

import datetime
from collections.abc import Sequence

import torch
import torch.distributed as dist

from xfuser.logger import init_logger

logger = init_logger(__name__)


class CollectiveTimeout(RuntimeError):
    """A collective did not complete within the group's timeout (a peer is stuck or diverged)."""


class GroupCoordinator:
    """A named process group: its global ranks, this rank's place in it, and its collectives.

    ``ranks`` are global ranks in group order; ``rank_in_group`` is this process's index in
    that order. Peer arguments (``src``, ``dst``) are group-local indices.
    """

    def __init__(
        self,
        name: str,
        ranks: Sequence[int],
        group: dist.ProcessGroup | None,
        global_rank: int,
        timeout_s: float = 300.0,
        device: torch.device | str = "cpu",
    ) -> None:
        if global_rank not in ranks:
            raise ValueError(f"rank {global_rank} is not a member of group {name} {list(ranks)}")
        self.name = name
        self.ranks = list(ranks)
        self.group = group
        self.global_rank = global_rank
        self.rank_in_group = self.ranks.index(global_rank)
        self.world_size = len(self.ranks)
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.device = torch.device(device)  # where this backend wants its tensors (NCCL: the local GPU)
        self.bytes_sent = 0
        self.num_collectives = 0

    # ------------------------------------------------------------------ topology helpers
    @property
    def is_first_rank(self) -> bool:
        return self.rank_in_group == 0

    @property
    def is_last_rank(self) -> bool:
        return self.rank_in_group == self.world_size - 1

    @property
    def next_rank(self) -> int:
        """Group-local index of the next peer in a ring (used by PipeFusion stages)."""
        return (self.rank_in_group + 1) % self.world_size

    @property
    def prev_rank(self) -> int:
        return (self.rank_in_group - 1) % self.world_size

    def reset_counters(self) -> None:
        self.bytes_sent = 0
        self.num_collectives = 0

    # ------------------------------------------------------------------ internals
    def _wait(self, work, what: str) -> None:
        try:
            work.wait(timeout=self.timeout)
        except RuntimeError as exc:  # gloo raises RuntimeError("... timed out ...")
            raise CollectiveTimeout(
                f"{what} on group '{self.name}' (ranks {self.ranks}) did not finish within "
                f"{self.timeout.total_seconds():.0f}s on global rank {self.global_rank}: a peer is "
                f"stuck or took a different code path ({exc})"
            ) from exc

    def _count(self, tensor: torch.Tensor, factor: float = 1.0) -> None:
        self.num_collectives += 1
        self.bytes_sent += int(tensor.numel() * tensor.element_size() * factor)

    def _global(self, local: int) -> int:
        return self.ranks[local]

    # ------------------------------------------------------------------ collectives
    def all_reduce(self, tensor: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
        """In-place reduction (SUM by default: gloo has no AVG); returns ``tensor``."""
        if self.world_size == 1:
            return tensor
        self._count(tensor, 2.0 * (self.world_size - 1) / self.world_size)
        self._wait(dist.all_reduce(tensor, op=op, group=self.group, async_op=True), "all_reduce")
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Concatenate every rank's ``tensor`` along ``dim`` in group order."""
        if self.world_size == 1:
            return tensor
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        self._count(tensor, self.world_size - 1)
        self._wait(dist.all_gather(parts, tensor, group=self.group, async_op=True), "all_gather")
        return torch.cat(parts, dim=dim)

    def all_gather_object(self, obj) -> list:
        """Gather a picklable object from every rank (debug paths only: it is slow)."""
        if self.world_size == 1:
            return [obj]
        out: list = [None] * self.world_size
        # object collectives have no async handle; the group's own timeout bounds them.
        dist.all_gather_object(out, obj, group=self.group)
        self.num_collectives += 1
        return out

    def all_to_all(self, tensor: torch.Tensor, scatter_dim: int, gather_dim: int) -> torch.Tensor:
        """Split ``tensor`` along ``scatter_dim`` across ranks and concatenate what arrives
        along ``gather_dim`` (the Ulysses exchange)."""
        if self.world_size == 1:
            return tensor
        if tensor.shape[scatter_dim] % self.world_size:
            raise ValueError(
                f"all_to_all on '{self.name}': dim {scatter_dim} of size {tensor.shape[scatter_dim]} "
                f"is not divisible by the group size {self.world_size}"
            )
        inputs = [t.contiguous() for t in torch.chunk(tensor, self.world_size, dim=scatter_dim)]
        outputs = [torch.empty_like(t) for t in inputs]
        self._count(tensor, (self.world_size - 1) / self.world_size)
        flat_in = torch.cat([t.reshape(-1) for t in inputs])
        flat_out = torch.empty_like(flat_in)
        self._wait(dist.all_to_all_single(flat_out, flat_in, group=self.group, async_op=True), "all_to_all")
        for i, chunk in enumerate(torch.chunk(flat_out, self.world_size)):
            outputs[i] = chunk.view_as(outputs[i])
        return torch.cat(outputs, dim=gather_dim)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """In-place broadcast from group-local ``src``; returns ``tensor``."""
        if self.world_size == 1:
            return tensor
        if self.rank_in_group == src:
            self._count(tensor, self.world_size - 1)
        self._wait(dist.broadcast(tensor, src=self._global(src), group=self.group, async_op=True), "broadcast")
        return tensor

    def isend(self, tensor: torch.Tensor, dst: int):
        """Non-blocking send to group-local ``dst``; finish with ``wait(work)``."""
        self._count(tensor)
        return dist.isend(tensor.contiguous(), dst=self._global(dst), group=self.group)

    def irecv(self, tensor: torch.Tensor, src: int):
        """Non-blocking receive into ``tensor`` from group-local ``src``; finish with ``wait(work)``."""
        return dist.irecv(tensor, src=self._global(src), group=self.group)

    def wait(self, work, what: str = "p2p") -> None:
        """Wait on a handle from ``isend``/``irecv`` under this group's timeout."""
        self._wait(work, what)

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        self.wait(self.isend(tensor, dst), "send")

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        self.wait(self.irecv(tensor, src), "recv")
        return tensor

    def barrier(self) -> None:
        if self.world_size == 1:
            return
        # a barrier is an all_reduce of one element: it then has a handle we can time out.
        self.all_reduce(torch.zeros(1, device=self.device))

    def __repr__(self) -> str:
        return f"GroupCoordinator({self.name}, ranks={self.ranks}, me={self.rank_in_group})"
