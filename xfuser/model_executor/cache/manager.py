"""CacheManager: one per transformer; owns the state, guards, statistics and agreement of ONE
generation, and runs every block call through the configured cache method.

Installation replaces each block in its ModuleList by a thin :class:`CachedBlock` that
forwards to :meth:`CacheManager.run_block`. The model's own forward (embedding, the loop over
blocks including HunyuanDiT's long skips and ConsisID's face injections, the output head) is
untouched, so adding a model is adding an adapter, and every runner (single process, USP,
CFG parallel, PipeFusion) that calls the transformer drives the same manager. A forward
pre-hook on the transformer advances the step counter and reads the real timestep.
"""
from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from xfuser.config.config import ConfigError
from xfuser.logger import init_logger, warn_once
from xfuser.model_executor.cache.adapters.base import BlockAdapter, BlockCall, Streams, adapter_for
from xfuser.model_executor.cache.methods import method_class
from xfuser.model_executor.cache.methods.base import CacheMethod
from xfuser.model_executor.cache.stats import CacheStatistics
from xfuser.model_executor.cache.sync import SyncGroup

logger = init_logger(__name__)


BLOCKS_FREED = "_xfuser_blocks_freed"  # set by PipeFusion when it moves other stages' blocks to meta


def check_installable(transformer: nn.Module, freed_ok: bool = False) -> None:
    """Raise (before any compute) when another wrapper or runner holds this transformer, or
    when PipeFusion freed some of its blocks (``freed_ok``: the PipeFusion runner itself
    re-installing its block path)."""
    if getattr(transformer, BLOCKS_FREED, False) and not freed_ok:
        raise ConfigError(
            "this pipeline ran under PipeFusion, which freed the blocks of the other stages; "
            "load it again (from_pretrained) before running it another way"
        )
    if getattr(transformer, "_xfuser_cache_manager", None) is not None:
        raise ConfigError(
            "this pipeline is already held by an xFuserFastCachePipelineWrapper or xDiTParallel; "
            "call close() on that object first"
        )


class NonFiniteError(RuntimeError):
    """The hidden states of a generation became NaN or infinite."""


def _any_nonfinite(streams: Streams) -> torch.Tensor:
    """1.0 when any stream holds a NaN/Inf, on the streams' device (no host read)."""
    flags = [(~torch.isfinite(s)).any() for s in streams]
    return torch.stack(flags).any().float()


class CachedBlock(nn.Module):
    """Stands in for block ``index``; the real block stays a registered child (``.block``)."""

    def __init__(self, block: nn.Module, index: int, manager: "CacheManager") -> None:
        super().__init__()
        self.block = block
        self.index = index
        # plain attribute, not a submodule: the manager must not appear in state_dict()
        object.__setattr__(self, "_manager", manager)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._manager.run_block(self.index, self.block, args, kwargs)


class CacheManager:
    """Cache state of one transformer. Create with :meth:`install`; call :meth:`reset` before
    every generation (the pipeline wrapper does)."""

    def __init__(self, transformer: nn.Module, config, sync: SyncGroup | None = None, adapter: BlockAdapter | None = None,
                 schedule_length: Callable[[], int | None] | None = None) -> None:
        self.transformer = transformer
        # the number of transformer calls of this generation as the pipeline scheduled them
        # (its scheduler's timesteps), read at the first call: the caller's step count may be
        # wrong (steps passed positionally, a custom ``timesteps=`` list)
        self.schedule_length = schedule_length
        self.config = config
        self.sync = sync or SyncGroup()
        self.adapter = adapter or adapter_for(transformer)
        self.slots = self.adapter.blocks(transformer)  # (ModuleList, position) in execution order
        self.num_blocks = len(self.slots)
        self.block_weights = [float(sum(p.numel() for p in lst[i].parameters())) for lst, i in self.slots]
        self.method = method_class(config.method)(self)
        self.num_steps: int | None = None
        self.step = -1
        self.t_norm: float | None = None
        self.auto_step = True
        self.debug_agreement = bool(getattr(config, "debug_cache_agreement", False)) or os.environ.get(
            "XFUSER_DEBUG_CACHE_AGREEMENT", "0"
        ) not in ("", "0")
        self._installed = False
        self._hook = None
        params = list(inspect.signature(transformer.forward).parameters)
        # where the timestep sits when passed positionally (looked up once, not per call)
        self._timestep_position = params.index(self.adapter.timestep_arg) if self.adapter.timestep_arg in params else None
        self.sequence_shard = None  # set by the USP runner: splits/gathers the streams
        self.patch_pipeline = None  # set by the PipeFusion runner: runs this stage's blocks per patch
        self.segments: list[tuple[int, int]] = [(0, self.num_blocks - 1)]  # PipeFusion: one per stage
        self.forward_call: tuple[tuple, dict] | None = None  # the current transformer call's inputs
        self._default_method = self.method
        self._decides = type(self.method).run_block is not CacheMethod.run_block  # not None: decisions exist
        self._pool: dict[Any, CacheMethod] = {}
        self.samples: int | None = None
        self.reset()

    # ------------------------------------------------------------------ lifecycle
    def install(self, freed_ok: bool = False) -> "CacheManager":
        """Wrap the blocks; ``freed_ok``: the PipeFusion runner re-installing after it freed blocks."""
        check_installable(self.transformer, freed_ok=freed_ok)
        for index, (blocks, position) in enumerate(self.slots):
            blocks[position] = CachedBlock(blocks[position], index, self)
        self._hook = self.transformer.register_forward_pre_hook(self._on_forward, with_kwargs=True)
        object.__setattr__(self.transformer, "_xfuser_cache_manager", self)
        self._installed = True
        return self

    def uninstall(self) -> None:
        """Put the original blocks back and remove the hook."""
        if not self._installed:
            return
        for blocks, position in self.slots:
            if isinstance(blocks[position], CachedBlock):
                blocks[position] = blocks[position].block
        if self._hook is not None:
            self._hook.remove()
        object.__setattr__(self.transformer, "_xfuser_cache_manager", None)
        self._installed = False

    def reset(self, num_inference_steps: int | None = None, samples: int | None = None) -> None:
        """Start a new generation: forget every reference, counter and statistic.

        ``samples``: images in the call (prompts x images per prompt). With more than one, every
        sample decides on its own metric (see :meth:`_sample_rows`), so an image does not depend
        on its batch-mates; None (unknown) keeps one decision for the whole batch."""
        if samples is not None and samples > 1 and self.patch_pipeline is not None and self._decides:
            raise ConfigError(
                f"--cache_method {self.config.method} under PipeFusion takes one image per replica, got {samples}: "
                "per-image cache decisions are not implemented for the patch pipeline; use --data_parallel_degree "
                "to spread the prompts, or --cache_method None"
            )
        self.num_steps = num_inference_steps
        self.samples = samples
        self._nonfinite: torch.Tensor | None = None
        self.step = -1
        self.t_norm = None
        self.method = self._default_method
        self._slots: dict[Any, tuple[Any, CacheStatistics]] = {}
        self.stats = CacheStatistics(self.method.name, self.num_blocks, self.block_weights)
        self.method.reset()
        if self.patch_pipeline is not None:
            self.patch_pipeline.reset()

    # ------------------------------------------------------------------ step bookkeeping
    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.patch_pipeline is not None:  # its last stage re-runs the head per patch
            self.forward_call = (args, kwargs)
        if not self.auto_step:
            return
        timestep = kwargs.get(self.adapter.timestep_arg)
        if timestep is None and self._timestep_position is not None and self._timestep_position < len(args):
            timestep = args[self._timestep_position]
        self.begin_step(self.adapter.normalised_timestep(timestep))

    def begin_step(self, t_norm: float | None = None) -> None:
        """Advance to the next denoising step (a runner that calls the transformer several
        times per step would set ``auto_step=False`` and call this; PipeFusion calls it once
        per step and loops over patches inside the call, so it keeps ``auto_step``)."""
        if self.num_steps is not None and self.step + 1 >= self.num_steps:
            # a new generation started without reset(): begin afresh rather than carry state over
            logger.debug("step counter passed num_steps=%d; starting a new generation", self.num_steps)
            self.reset(self.num_steps, self.samples)
        if self.step < 0:
            self._adopt_schedule()
        self.step += 1
        self.t_norm = t_norm
        if not self._slots:
            self.stats.begin_step(self.step, t_norm)

    def _adopt_schedule(self) -> None:
        """At a generation's first transformer call, take the step count from the scheduler's
        real schedule when it differs from the one given to :meth:`reset` (nothing is cached
        yet, so only the method's per-generation setup is redone)."""
        steps = self.schedule_length() if self.schedule_length is not None else None
        if not steps or steps == self.num_steps:
            return
        if self.num_steps is not None:
            logger.debug("the scheduler runs %d steps, not %d: using its schedule", steps, self.num_steps)
        self.num_steps = int(steps)
        self.method.reset()

    def use_slot(self, key: Any) -> None:
        """Switch to the cache state of ``key`` (PipeFusion: one per latent patch, since
        references are per token row, and ``"full"`` for the full-image warm-up steps). The
        step counter, timestep and guards stay shared."""
        entry = self._slots.get(key)
        if entry is None:
            method = self._pool.get(key)  # built once per key (FastCache reads its calibration file)
            if method is None:
                method = self._pool[key] = method_class(self.config.method)(self)
            method.reset()
            entry = self._slots[key] = (method, CacheStatistics(method.name, self.num_blocks, self.block_weights))
        self.method, self.stats = entry
        if not self.stats.steps or self.stats.steps[-1]["step"] != self.step:
            self.stats.begin_step(self.step, self.t_norm)

    def slot_statistics(self) -> dict[Any, CacheStatistics]:
        return {key: stats for key, (_, stats) in self._slots.items()}

    def segment(self, index: int) -> tuple[int, int]:
        """(first, last) block of the pipeline segment holding ``index`` (the whole stack
        outside PipeFusion, this stage's blocks under it)."""
        for first, last in self.segments:
            if first <= index <= last:
                return first, last
        raise IndexError(f"block {index} is in no segment {self.segments}")

    # ------------------------------------------------------------------ helpers for methods
    def forced_compute(self) -> bool:
        """Guards shared by every method: cache warm-up steps, and the last step computes."""
        if self.step < self.config.cache_warmup_steps:
            return True
        return self.num_steps is not None and self.step >= self.num_steps - 1

    def may_skip(self, consecutive: int) -> bool:
        """Cap on consecutive cached steps (``max_cached_steps`` < 0: no cap)."""
        cap = self.config.max_cached_steps
        return cap is None or cap < 0 or consecutive < cap

    def compute(self, call: BlockCall) -> Streams:
        return self.adapter.output_streams(call.run())

    def block_skipped(self, call: BlockCall) -> None:
        """A method skips block ``call`` on its true input (FastCache's per-block skip). Under
        PipeFusion the block's K/V rows of this patch are refreshed, so the other patches do not
        read rows that grow one step older with every skip."""
        if self.patch_pipeline is not None:
            self.patch_pipeline.refresh_kv(call)

    def compute_token_subset(self, call: BlockCall, index: torch.Tensor) -> Streams:
        return self.adapter.run_token_subset(call, index)

    # ------------------------------------------------------------------ the block path
    def run_block(self, index: int, block: nn.Module, args: tuple, kwargs: dict) -> Any:
        if self.step < 0:
            self.begin_step(None)
        if self.patch_pipeline is not None:
            return self.patch_pipeline.run_block(index, block, args, kwargs)
        call = self.adapter.bind(block, args, kwargs)
        if self.sequence_shard is not None:
            call = self.sequence_shard.shard(call, index)
        streams = self.run_method(index, call)
        self._check_finite(index, call.streams, streams)
        if self.sequence_shard is not None and index == self.num_blocks - 1:
            streams = self.sequence_shard.gather(streams)
        if index == self.num_blocks - 1 and self.debug_agreement:
            self.sync.verify_same(self.decision_log()[-1:], f"cache decisions of step {self.step}")
        return self.adapter.pack_output(streams)

    def _check_finite(self, index: int, inputs: Streams, outputs: Streams) -> None:
        """Stop a generation whose hidden states became NaN/Inf, naming the step and the first
        block that produced them (or its input). Per block only a flag is written on the
        device; the flags are summed over the sync group and read once per step, at the last
        block, so every rank of the forward raises together and no block adds a host read."""
        if index == 0:
            self._nonfinite = torch.zeros(self.num_blocks + 1, device=inputs[0].device)
            self._nonfinite[0] = _any_nonfinite(inputs)
        if self._nonfinite is None:
            return
        self._nonfinite[index + 1] = _any_nonfinite(outputs)
        if index < self.num_blocks - 1:
            return
        flags = self.sync.reduce_sum(self._nonfinite).tolist()
        self._nonfinite = None
        bad = next((i for i, flag in enumerate(flags) if flag), None)
        if bad is not None:
            where = "in the input of block 0" if bad == 0 else f"first in the output of block {bad - 1} of {self.num_blocks}"
            raise NonFiniteError(
                f"NaN/Inf hidden states at denoising step {self.step} (t={self.t_norm}), {where}: check the weights "
                "and inputs; in float16 an overflow does this (try --dtype bf16 or fp32)"
            )

    def run_method(self, index: int, call: BlockCall) -> Streams:
        """Block ``index`` through the cache method, once per sample of the batch when there are
        several (each with its own state and statistics), and the action recorded."""
        lanes = self._sample_rows(call)
        if lanes is None:
            streams, action, fraction = self.method.run_block(index, call)
            self.stats.record(index, action, fraction)
            return streams
        batch = call.streams[0].shape[0]
        parts = []
        for lane, rows in enumerate(lanes):
            self.use_slot(("sample", lane))
            streams, action, fraction = self.method.run_block(index, call.rows(rows, batch))
            self.stats.record(index, action, fraction)
            parts.append(streams)
        if all(len(rows) == 1 for rows in lanes):  # row i is lane i: concatenation is the batch
            return tuple(torch.cat(pieces) for pieces in zip(*parts))
        # CFG pairs: lane i holds rows (i, n + i); interleave back to [uncond...; cond...]
        return tuple(torch.stack(pieces).transpose(0, 1).flatten(0, 1) for pieces in zip(*parts))

    def _sample_rows(self, call: BlockCall) -> list[list[int]] | None:
        """Batch rows of each sample, or None for one decision over the whole batch.

        Diffusers batches classifier-free guidance as [uncond of every sample; cond of every
        sample], so with ``samples`` = n a batch of 2n rows holds sample i in rows (i, n + i) --
        the pair decides together, as a single sample's batch does -- and a batch of n (no CFG,
        or this rank's half under CFG parallel, whose peer holds the other row of each pair)
        holds it in row i. Every rank of a forward has the same n, hence the same lanes in the
        same order, and reduces each lane's metrics over its sync group as before."""
        n = self.samples
        if not self._decides or n is None or n <= 1:
            return None
        batch = call.streams[0].shape[0]
        if batch == n:
            return [[i] for i in range(n)]
        if batch == 2 * n:
            return [[i, n + i] for i in range(n)]
        warn_once(logger, "a batch of %d rows for %d samples: cache decisions are shared by the batch", batch, n)
        return None

    # ------------------------------------------------------------------ reporting
    def merged_stats(self) -> CacheStatistics:
        if not self._slots:
            return self.stats
        return CacheStatistics.merge_patches(list(self.slot_statistics().values()))

    def statistics(self) -> dict[str, Any]:
        summary = self.merged_stats().summary()
        if hasattr(self.method, "held_out_errors"):
            errors = self.method.held_out_errors()
            for entry in summary["per_block"]:
                if entry["block"] in errors:
                    entry["approximation"] = errors[entry["block"]]
        methods = [method for method, _ in self._slots.values()] or [self.method]
        per_block = [sum(col) for col in zip(*(method.state_bytes() for method in methods))]
        summary["cache_state_bytes"] = {"per_block": per_block, "total": sum(per_block)}
        summary.update(self.method.extra_statistics())
        summary["family"] = self.adapter.family
        summary["config"] = {
            k: getattr(self.config, k)
            for k in ("cache_ratio_threshold", "motion_threshold", "significance_level", "cache_warmup_steps", "max_cached_steps", "approximation")
            if hasattr(self.config, k)
        }
        return summary

    def decision_log(self) -> list[tuple]:
        return self.merged_stats().decision_log()

