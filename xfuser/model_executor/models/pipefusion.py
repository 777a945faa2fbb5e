"""PipeFusion on the block path: transformer blocks split into stages, the image into patches.

Every rank runs the pipeline's own denoising loop and calls the whole transformer once per
step (embeddings and output head are cheap and run on the full image everywhere; after setup
the blocks a stage does not own are moved to the meta device, so each rank keeps only its
stage's weights -- the whole model is loaded first, then freed).
When the model's block loop reaches block 0, this runner takes over and runs *its stage's*
blocks patch by patch:

* stage 0 slices patch ``p`` of the embedded image (rows of the token grid, top to bottom),
  runs its blocks and sends the result to stage 1 over P2P; stage ``s`` receives, runs, sends;
  the last stage collects the patches. While stage 1 works on patch ``p``, stage 0 already
  works on patch ``p + 1``: that overlap is the parallelism;
* attention reads full-image keys/values: each layer's buffer is refreshed by the current
  patch and holds the other patches' rows from when they last passed through that layer (the
  previous step, or earlier when the cache skipped the layer for that patch);
* the first ``warmup_steps`` steps run the full image as one patch (exact; fills the buffers);
* at the end of the step the last stage broadcasts the finished hidden states to the stage
  peers, and the remaining block calls of the model's loop pass them through, so the output
  head, the guidance and the scheduler step run on identical full latents on every rank
  (patches pipeline within a step; there is no overlap across steps, see docs/architecture.md).

Caching: every patch keeps its own cache state (references are per token row). A decision that
block 0 makes for the whole stack (Fb's hit, TeaCache's skip, FastCache's τ and motion tokens)
travels to the later stages with the patch's activations, in a header that is always sent,
so no stage waits on a collective or a message that another stage skipped. Per-block
decisions are taken by the stage that owns the block, on metrics reduced over its CFG x SP
peers. Stages are the cache methods' stack *segments*: a reused step adds each stage's cached
residual, which telescopes to the single-process stack residual.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch

from xfuser.config.config import ConfigError
from xfuser.logger import init_logger
from xfuser.model_executor.cache.adapters.base import BlockAdapter, BlockCall, Streams
from xfuser.model_executor.layers.pipefusion_attention import PatchKVContext

logger = init_logger(__name__)


def stage_ranges(num_blocks: int, degree: int, layers_per_stage: list[int] | None = None) -> list[tuple[int, int]]:
    """(first, last) block of each stage: ``layers_per_stage`` if given, else an even split
    with the earlier stages taking the remainder."""
    if degree > num_blocks:
        raise ConfigError(
            f"--pipefusion_parallel_degree {degree} exceeds the transformer's {num_blocks} blocks: every stage needs a block"
        )
    if layers_per_stage is not None:
        if sum(layers_per_stage) != num_blocks:
            raise ConfigError(
                f"--attn_layer_num_for_pp {list(layers_per_stage)} sums to {sum(layers_per_stage)}, "
                f"but the transformer has {num_blocks} blocks"
            )
        counts = list(layers_per_stage)
    else:
        counts = [num_blocks // degree + (1 if s < num_blocks % degree else 0) for s in range(degree)]
    out, first = [], 0
    for n in counts:
        out.append((first, first + n - 1))
        first += n
    return out


class PatchPipeline:
    """This rank's stage of the patch pipeline (see the module docstring)."""

    def __init__(self, manager, adapter: BlockAdapter, pp_group, sp_group, stages: list[tuple[int, int]],
                 num_patches: int, warmup_steps: int, context: PatchKVContext) -> None:
        self.manager = manager
        self.adapter = adapter
        self.pp = pp_group
        self.sp = sp_group
        self.stages = stages
        self.stage = pp_group.rank_in_group
        self.first_block, self.last_block = stages[self.stage]
        self.num_patches = num_patches
        self.warmup_steps = warmup_steps
        self.context = context
        self.sp_rank = sp_group.rank_in_group if sp_group is not None else 0
        self.sp_world = sp_group.world_size if sp_group is not None else 1
        self._params: dict[type, set[str]] = {}
        # long skips (HunyuanDiT): consumer -> producer; a producer's output travels with the
        # patch through every stage boundary between the two
        self.skips = adapter.long_skips(manager.num_blocks)
        stage_of = {b: s for s, (first, last) in enumerate(stages) for b in range(first, last + 1)}
        self.carry_in = sorted(p for c, p in self.skips.items() if stage_of[p] < self.stage <= stage_of[c])
        self.carry_out = sorted(p for c, p in self.skips.items() if stage_of[p] <= self.stage < stage_of[c])
        manager.segments = list(stages)
        manager.patch_pipeline = self
        manager.sequence_shard = None  # the runner splits the patches over SP itself

    def reset(self) -> None:
        self.context.reset()

    # ------------------------------------------------------------------ the block path
    def run_block(self, index: int, block: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
        call = self.adapter.bind(block, args, kwargs)
        if index != 0:
            return self.adapter.pack_output(call.streams)  # block 0 already ran the whole stack
        return self.adapter.pack_output(self._run_step(call))

    def _block(self, index: int) -> torch.nn.Module:
        blocks, position = self.manager.slots[index]
        return getattr(blocks[position], "block", blocks[position])

    def _local(self, name: str, tensor: torch.Tensor, start: int, end: int) -> torch.Tensor:
        if name == self.adapter.streams[0]:
            tensor = tensor[:, start:end]
        if self.sp_world > 1 and name in self.adapter.sp_split_streams:
            tensor = tensor.chunk(self.sp_world, dim=1)[self.sp_rank]
        return tensor.contiguous()

    def _call(self, index: int, arguments: dict[str, Any], streams: Streams, start: int, end: int,
              lengths: dict[str, int], skip: torch.Tensor | None = None) -> BlockCall:
        block = self._block(index)
        params = self._params.get(type(block))
        if params is None:
            sig = inspect.signature(block.forward)
            params = self._params[type(block)] = {
                n for n, p in sig.parameters.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
            }
        kwargs = {k: v for k, v in arguments.items() if k in params and k not in self.adapter.streams}
        kwargs.update(zip(self.adapter.streams, streams))
        if skip is not None:
            kwargs["skip"] = skip
        call = self.adapter.bind(block, (), kwargs)
        self.adapter.patch_block_kwargs(call, start, end, lengths)
        if self.sp_world > 1:
            patch_lengths = {**lengths, self.adapter.streams[0]: end - start}
            self.adapter.shard_block_kwargs(call, self.sp_rank, self.sp_world, patch_lengths)
        return call

    def _run_step(self, call0: BlockCall) -> Streams:
        m, pp = self.manager, self.pp
        names = self.adapter.streams
        full = call0.streams
        lengths = {n: t.shape[1] for n, t in zip(names, full)}
        n_image = full[0].shape[1]
        warm = m.step < self.warmup_steps
        patches = 1 if warm else self.num_patches
        if n_image % patches:
            raise ConfigError(f"{n_image} image tokens cannot be split into --num_pipeline_patch {patches} patches")
        arguments = dict(call0.bound.arguments)
        is_first, is_last = self.stage == 0, self.stage == len(self.stages) - 1
        sends: list = []  # (work, tensor): a tensor must outlive its send
        outputs: list[Streams] = []
        for p in range(patches):
            start, end = p * n_image // patches, (p + 1) * n_image // patches
            m.use_slot("full" if warm else p)
            self.context.set_patch(start, end, n_image)
            local = [self._local(n, t, start, end) for n, t in zip(names, full)]
            n_local = local[0].shape[1]
            header_len = m.method.step_state_size(n_local)
            header = None
            produced: dict[int, torch.Tensor] = {}  # long-skip sources of this patch
            if is_first:
                x = tuple(local)
            else:
                header = torch.empty(header_len, dtype=torch.float64, device=local[0].device)
                works = [pp.irecv(header, pp.prev_rank)] if header_len else []
                x = tuple(torch.empty_like(t) for t in local)
                works += [pp.irecv(t, pp.prev_rank) for t in x]
                for source in self.carry_in:
                    produced[source] = torch.empty_like(local[0])
                    works.append(pp.irecv(produced[source], pp.prev_rank))
                for w in works:
                    pp.wait(w, "PipeFusion recv")
                if header_len:
                    m.method.import_step_state(header.tolist())
            self.context.n_text_local = local[1].shape[1] if len(local) > 1 else 0
            for index in range(self.first_block, self.last_block + 1):
                skip = produced.get(self.skips[index]) if index in self.skips else None
                call = self._call(index, arguments, x, start, end, lengths, skip)
                x, action, fraction = m.method.run_block(index, call)
                m.stats.record(index, action, fraction)
                if index in self.carry_out or index in self.skips.values():
                    produced[index] = x[0]
                if index == 0:
                    header = torch.tensor(m.method.export_step_state(n_local), dtype=torch.float64, device=x[0].device)
            if is_last:
                outputs.append(x)
                continue
            for name, out, expected in zip(names, x, local):
                # the next stage sized its receive buffers from its own inputs: a block that
                # changed a stream's shape or dtype would corrupt the exchange, so fail loudly
                if out.shape != expected.shape or out.dtype != expected.dtype:
                    raise RuntimeError(
                        f"PipeFusion stage {self.stage}: {name} leaves block {self.last_block} as "
                        f"{tuple(out.shape)} {out.dtype}, but stages exchange {tuple(expected.shape)} {expected.dtype}"
                    )
            carried = [produced[source].contiguous() for source in self.carry_out]
            for t in ([header] if header_len else []) + [t.contiguous() for t in x] + carried:
                sends.append((pp.isend(t, pp.next_rank), t))
        for work, _ in sends:
            pp.wait(work, "PipeFusion send")
        if m.debug_agreement:  # this stage's decisions of this step, across its CFG x SP peers
            m.sync.verify_same(m.decision_log()[-1:], f"PipeFusion cache decisions of step {m.step}")
        if is_last:
            result = [torch.cat([self._gather(names[0], o[0]) for o in outputs], dim=1)]
            result += [self._gather(n, t) for n, t in zip(names[1:], outputs[-1][1:])]
        else:
            result = [torch.empty_like(t) for t in full]
        return tuple(pp.broadcast(t.contiguous(), src=len(self.stages) - 1) for t in result)

    def _gather(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if self.sp_world > 1 and name in self.adapter.sp_split_streams:
            return self.sp.all_gather(tensor.contiguous(), dim=1)
        return tensor

    # ------------------------------------------------------------------ statistics
    def merge_stage_statistics(self) -> None:
        """Each stage recorded only its own blocks; give every rank every block's actions (a
        collective over the stage peers, called once per generation on every rank)."""
        mine = {
            key: [(r["actions"], r["token_fraction"], r["metrics"]) for r in stats.steps]
            for key, stats in self.manager.slot_statistics().items()
        }
        everyone = self.pp.all_gather_object(mine)
        for key, stats in self.manager.slot_statistics().items():
            for i, record in enumerate(stats.steps):
                for stage, (first, last) in enumerate(self.stages):
                    actions, fractions, metrics = everyone[stage][key][i]
                    record["actions"][first:last + 1] = actions[first:last + 1]
                    record["token_fraction"][first:last + 1] = fractions[first:last + 1]
                    for name, value in metrics.items():
                        record["metrics"].setdefault(name, value)


def free_foreign_blocks(manager, stages: list[tuple[int, int]], stage: int) -> None:
    """Move the blocks other stages own to the meta device: a stage holds only its weights."""
    first, last = stages[stage]
    for index, (blocks, position) in enumerate(manager.slots):
        if not first <= index <= last:
            block = blocks[position]
            getattr(block, "block", block).to("meta")
