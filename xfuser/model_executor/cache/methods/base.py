"""The cache-method interface: a policy that, for each block call, decides what to run.

Methods are small: the manager owns state, guards, statistics and agreement, and offers the
mechanics (compute a block, pass it through, read/update per-block references). A method
only turns metrics into actions. Every metric that feeds a decision goes through
``manager.sync.reduce_sum`` first, so the decision is identical on all ranks of a forward.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from xfuser.model_executor.cache.adapters.base import BlockCall, Streams

if TYPE_CHECKING:
    from xfuser.model_executor.cache.manager import CacheManager


def tensor_bytes(tensors) -> int:
    """Bytes held by the tensors among ``tensors`` (None entries and non-tensors count 0)."""
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


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

    def state_bytes(self) -> list[int]:
        """Bytes of cached tensors held for each block (stack methods: at a segment's first block)."""
        out = [0] * self.manager.num_blocks
        for store in (getattr(self, "anchor_now", {}), getattr(self, "anchor_ref", {}), getattr(self, "seg_out_ref", {})):
            for first, tensors in store.items():
                out[first] += tensor_bytes(tensors)
        out[0] += tensor_bytes(self.step_tensors())
        return out

    def step_tensors(self) -> tuple:
        """Per-step tensors a method keeps besides its stack references (counted at block 0)."""
        return ()

    def extra_statistics(self) -> dict:
        """Method-specific entries for ``get_cache_statistics()`` (none by default)."""
        return {}

    # ------------------------------------------------------------------ step-level decisions
    def step_state_size(self, n_tokens: int) -> int:
        """Length of :meth:`export_step_state` for ``n_tokens`` local image tokens."""
        return 0

    def export_step_state(self, n_tokens: int) -> list[float]:
        """What later PipeFusion stages need of this step's decision for the current patch
        (made at block 0, on the first stage); fixed length for ``n_tokens`` local image tokens."""
        return []

    def import_step_state(self, values: list[float]) -> None:
        """Adopt the decision exported by the stage that holds block 0 (PipeFusion)."""

    # ------------------------------------------------------------------ stack reuse (Fb, Tea)
    def reset_stack(self) -> None:
        # per segment (keyed by its first block): anchor of this step, anchor and output at the
        # last computed step. One segment in a single process; one per stage under PipeFusion.
        self.anchor_now: dict[int, Streams] = {}
        self.anchor_ref: dict[int, Streams] = {}
        self.seg_out_ref: dict[int, Streams] = {}

    def stack_block(self, index: int, call: BlockCall, reuse: bool) -> tuple[Streams, str, float]:
        """Block ``index`` of a stack whose step decision is ``reuse``.

        Computing, a segment's last block records (anchor, output). Reusing, blocks pass
        through and the segment's last block returns ``out_ref + (anchor_now - anchor_ref)``:
        the cached residual added to this step's anchor, written so a repeated anchor returns
        ``out_ref`` bit for bit, and anchored on the anchor rather than the block's input so
        anything the model adds between blocks (ConsisID's face features) is neither lost nor
        counted twice. A segment's anchor is its input, unless the method set it before (Fb:
        block 0's output, for the segment holding block 0). Under PipeFusion each stage is a
        segment; the residuals telescope, so the stack output equals the single-segment one."""
        first, last = self.manager.segment(index)
        if index == first:
            self.anchor_now[first] = call.streams
        if reuse:
            if index < last:
                return call.streams, "R", 0.0
            out_ref, anchor_ref = self.seg_out_ref[first], self.anchor_ref[first]
            return tuple(o + (a - r) for o, a, r in zip(out_ref, self.anchor_now[first], anchor_ref)), "R", 0.0
        out = self.manager.compute(call)
        if index == last:
            self.anchor_ref[first], self.seg_out_ref[first] = self.anchor_now[first], out
        return out, "C", 1.0


class NoCache(CacheMethod):
    """``None``: always compute (bookkeeping only; the overhead baseline)."""

    name = "None"
