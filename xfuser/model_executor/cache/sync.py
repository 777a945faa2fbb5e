"""Agreement across the ranks that share one forward pass (the *sync group*).

A cache decision is a branch: if two ranks of one forward take different branches, one of
them waits forever on an all-to-all the other skipped. So every decision is derived from
metrics that were first summed over the sync group (SUM: gloo has no AVG); a SUM all-reduce
returns the same bits on every rank, hence the same decision, by construction. The debug
check (:meth:`SyncGroup.verify_same`) compares whole decision logs to prove it on a run.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


class SyncGroup:
    """Single-process sync group: every reduction is the identity.

    Three scopes: the whole group (``reduce_sum``: all ranks of one forward), the *batch*
    peers (``reduce_batch``: CFG ranks holding other samples of the same tokens) and the
    *sequence* peers (``seq_counts``: SP ranks holding other tokens of the same samples).
    """

    world_size: int = 1
    batch_world: int = 1
    seq_world: int = 1

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def reduce_batch(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks that hold the same tokens of other batch entries."""
        return tensor

    def seq_counts(self, count: int, device: torch.device | None = None) -> list[int]:
        """Every sequence peer's value of ``count`` (in sequence-rank order)."""
        return [count]

    def gather_objects(self, obj) -> list:
        return [obj]

    def verify_same(self, log: Sequence, what: str = "cache decision log") -> None:
        """Raise if ``log`` differs on any rank of the group."""
        logs = self.gather_objects(list(log))
        for rank, other in enumerate(logs):
            if other != logs[0]:
                first = next(
                    (i for i, (a, b) in enumerate(zip(logs[0], other)) if a != b), min(len(logs[0]), len(other))
                )
                raise RuntimeError(
                    f"{what} differs between sync-group rank 0 and rank {rank} at entry {first}: "
                    f"{logs[0][first:first + 3]} vs {other[first:first + 3]}"
                )


class CoordinatorSync(SyncGroup):
    """Sync group backed by coordinators: ``coordinator`` spans every rank of the forward
    (SP x CFG), ``batch`` the CFG peers, ``seq`` the SP peers (either may be None)."""

    def __init__(self, coordinator, batch=None, seq=None) -> None:
        self.coordinator = coordinator
        self.batch = batch
        self.seq = seq
        self.world_size = coordinator.world_size
        self.batch_world = batch.world_size if batch is not None else 1
        self.seq_world = seq.world_size if seq is not None else 1

    def reduce_batch(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.batch is None or self.batch.world_size == 1:
            return tensor
        return self.batch.all_reduce(tensor.clone())

    def seq_counts(self, count: int, device: torch.device | None = None) -> list[int]:
        if self.seq is None or self.seq.world_size == 1:
            return [count]
        gathered = self.seq.all_gather(torch.tensor([count], dtype=torch.int64, device=device or self.seq.device))
        return [int(c) for c in gathered.tolist()]

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        return self.coordinator.all_reduce(tensor.clone())

    def gather_objects(self, obj) -> list:
        return self.coordinator.all_gather_object(obj)
