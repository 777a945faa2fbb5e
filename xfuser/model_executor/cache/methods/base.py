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

    def reuse_stack_tail(
        self, index: int, call: BlockCall, anchor_now: Streams, anchor_ref: Streams, out_ref: Streams
    ) -> tuple[Streams, str, float]:
        """Blocks after the decision point of a reused stack: pass through, and let the last
        block return ``out_ref + (anchor_now - anchor_ref)`` -- the cached residual added to
        this step's anchor, written so a repeated anchor returns ``out_ref`` bit for bit, and
        anchored on the anchor rather than this block's input so anything the model adds
        between blocks (ConsisID's face features) is neither lost nor counted twice."""
        if index < self.manager.num_blocks - 1:
            return call.streams, "R", 0.0
        return tuple(o + (a - r) for o, a, r in zip(out_ref, anchor_now, anchor_ref)), "R", 0.0


class NoCache(CacheMethod):
    """``None``: always compute (bookkeeping only; the overhead baseline)."""

    name = "None"
