"""The cache-method interface: a policy that, for each block call, decides what to run.

Methods are small: the manager owns state, guards, statistics and agreement, and offers the
mechanics (compute a block, pass it through, read/update per-block references). A method
only turns metrics into actions. Every metric that feeds a decision goes through
``manager.sync.reduce_sum`` first, so the decision is identical on all ranks of a forward.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from xfuser.model_executor.cache.adapters.base import BlockCall, Streams

if TYPE_CHECKING:
    from xfuser.model_executor.cache.manager import CacheManager


class CacheMethod:
    name: ClassVar[str] = "None"

    def __init__(self, manager: "CacheManager") -> None:
        self.manager = manager
        self.config = manager.config

    def reset(self) -> None:
        """Forget everything from the previous generation."""

    def run_block(self, index: int, call: BlockCall) -> tuple[Streams, str, float]:
        """Return (output streams, action code, computed token fraction)."""
        return self.manager.compute(call), "C", 1.0


class NoCache(CacheMethod):
    """``None``: always compute (bookkeeping only; the overhead baseline)."""

    name = "None"
