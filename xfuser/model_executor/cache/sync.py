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
    """Single-process sync group: every reduction is the identity."""

    world_size: int = 1

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

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
    """Sync group backed by one :class:`GroupCoordinator` (e.g. SP x CFG peers)."""

    def __init__(self, coordinator) -> None:
        self.coordinator = coordinator
        self.world_size = coordinator.world_size

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        return self.coordinator.all_reduce(tensor.clone())

    def gather_objects(self, obj) -> list:
        return self.coordinator.all_gather_object(obj)
