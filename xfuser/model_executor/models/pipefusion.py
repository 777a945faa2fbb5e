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
* in a warm-up step the last stage broadcasts the finished hidden states to the stage peers,
  and the remaining block calls of the model's loop pass them through, so the output head, the
  guidance and the scheduler step run on identical full latents on every rank;
* after the warm-up, steps overlap: the last stage finishes each patch itself (the model's own
  head, guidance, and a step of that patch's scheduler, ``schedulers/patch_scheduler.py``) and
  sends its new latents to stage 0, which re-embeds them and starts the next step on that
  patch while later stages finish this one; the pipeline's ``scheduler.step`` is held for the
  generation and the final latents are broadcast once. Schedulers that are not patch-aware,
  and ``--pipefusion_sync_steps``, drain the pipeline every step instead (same result).

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
from contextlib import nullcontext
from typing import Any

import torch

from xfuser.config.config import ConfigError
from xfuser.logger import init_logger, warn_once
from xfuser.model_executor.cache.adapters.base import BlockAdapter, BlockCall, Streams
from xfuser.model_executor.cache.manager import BLOCKS_FREED
from xfuser.model_executor.layers.pipefusion_attention import PatchKVContext
from xfuser.model_executor.schedulers.patch_scheduler import StepOverride, not_patch_aware_reason, patch_scheduler

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


def latent_rows(tensor: torch.Tensor, start: int, end: int, num_tokens: int) -> torch.Tensor:
    """The part of a latent-space tensor that holds image tokens ``[start, end)`` of
    ``num_tokens`` (a view): token rows are latent rows, so a ``(B, C, H, W)`` latent is cut
    along H, a packed ``(B, tokens, C)`` latent (Flux) along its tokens."""
    if tensor.dim() == 4:
        height = tensor.shape[-2]
        return tensor[..., start * height // num_tokens:end * height // num_tokens, :]
    if tensor.dim() == 3 and tensor.shape[1] == num_tokens:
        return tensor[:, start:end]
    raise ValueError(f"PipeFusion: cannot locate {num_tokens} image tokens in a latent of shape {tuple(tensor.shape)}")


class PatchPipeline:
    """This rank's stage of the patch pipeline (see the module docstring)."""

    def __init__(self, manager, adapter: BlockAdapter, pp_group, sp_group, stages: list[tuple[int, int]],
                 num_patches: int, warmup_steps: int, context: PatchKVContext, step_overlap: bool = True) -> None:
        self.manager = manager
        self.adapter = adapter
        self.transformer = manager.transformer
        self.pp = pp_group
        self.sp = sp_group
        self.stages = stages
        self.stage = pp_group.rank_in_group
        self.first_block, self.last_block = stages[self.stage]
        self.is_first, self.is_last = self.stage == 0, self.stage == len(stages) - 1
        self.num_patches = num_patches
        self.warmup_steps = warmup_steps
        self.context = context
        self.step_overlap = step_overlap
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
        self.overlap = False  # set per generation by begin_generation()
        self.reset()

    def reset(self) -> None:
        self.context.reset()
        self._inject: Streams | None = None  # streams block 0 hands back when re-running the head
        self._latents: torch.Tensor | None = None  # stage 0 / last stage: the true latents
        self._schedulers: list | None = None  # last stage: one patch scheduler per patch
        self._latent_recvs: list | None = None  # stage 0: this step's patch latents from the last stage
        self._head: list[torch.Tensor] | None = None  # last stage: full-image block outputs

    # ------------------------------------------------------------------ cross-step overlap
    def begin_generation(self, scheduler, guidance_scale: float | None, do_cfg: bool, cfg_group,
                         step_kwargs: dict[str, Any], guidance_rescale: float = 0.0):
        """Decide whether this generation overlaps denoising steps and return the context that
        holds the pipeline's scheduler step while it does (the last stage steps each patch
        itself; see ``schedulers/patch_scheduler.py``)."""
        reason = None if self.step_overlap else "--pipefusion_sync_steps"
        reason = reason or not_patch_aware_reason(scheduler, step_kwargs)
        if reason is None and self.adapter.image_embedder is None:
            reason = f"the {self.adapter.family} adapter names no image embedder"
        if reason is None and guidance_rescale:
            reason = "guidance_rescale > 0 rescales by the whole image's std"
        self.overlap = reason is None
        if not self.overlap:
            if self.step_overlap:
                warn_once(logger, f"PipeFusion: denoising steps do not overlap ({reason}); patches pipeline within each step")
            return nullcontext()
        self.scheduler = scheduler
        self.guidance_scale = guidance_scale
        self.do_cfg = do_cfg
        self.cfg_group = cfg_group if cfg_group is not None and cfg_group.world_size > 1 else None
        self.step_kwargs = dict(step_kwargs)
        return StepOverride(scheduler, self._overlapping, self._scheduler_step)

    def _overlapping(self) -> bool:
        return self.overlap and self.manager.step >= self.warmup_steps

    def _final_step(self) -> bool:
        m = self.manager
        return m.num_steps is not None and m.step >= m.num_steps - 1

    def _scheduler_step(self, sample: torch.Tensor) -> torch.Tensor:
        """The pipeline's scheduler step of an overlapped step: the last stage has stepped every
        patch already; at the last step it broadcasts the final latents to its stage peers (the
        only full-size exchange of an overlapped generation). Other stages' latents between
        steps are placeholders (stage 0 receives each patch's latents from the last stage)."""
        if not self._final_step():
            return self._latents.clone() if self.is_last else sample
        final = self._latents.clone() if self.is_last else torch.empty_like(sample)
        return self.pp.broadcast(final, src=len(self.stages) - 1)

    def _copies(self) -> int:
        """Latent batches in this rank's model input: 2 when cond and uncond share the forward."""
        return 2 if self.do_cfg and self.cfg_group is None else 1

    def _start_overlap(self, model_input: torch.Tensor, n_image: int, embedded: torch.Tensor) -> None:
        """First overlapped step: the true latents are the model input (the warm-up steps were
        synchronous); the last stage derives one scheduler per patch from the pipeline's."""
        batch = model_input.shape[0] // self._copies()
        self._latents = model_input[:batch].clone()
        if self.is_first:
            mine = self._embed(n_image)
            if mine.shape != embedded.shape or not torch.allclose(mine, embedded, rtol=1e-4, atol=1e-5):
                raise RuntimeError(
                    f"PipeFusion: {self.adapter.family}.{self.adapter.image_embedder} does not reproduce the model's "
                    "image stream, so patches cannot be re-embedded; run with --pipefusion_sync_steps"
                )
        if self.is_last:
            bounds = self._bounds(n_image, self.num_patches)
            self._schedulers = [
                patch_scheduler(self.scheduler, self._latents.shape, lambda x, s=s, e=e: latent_rows(x, s, e, n_image))
                for s, e in bounds
            ]

    def _embed(self, n_image: int) -> torch.Tensor:
        """Image stream of the current true latents (stage 0), as the model's forward embeds it."""
        embedder = getattr(self.transformer, self.adapter.image_embedder)
        model_input = self._latents.repeat(self._copies(), *([1] * (self._latents.dim() - 1)))
        return embedder(model_input)

    def _post_latent_recvs(self, n_image: int) -> None:
        self._latent_recvs = []
        for s, e in self._bounds(n_image, self.num_patches):
            buffer = torch.empty_like(latent_rows(self._latents, s, e, n_image))
            self._latent_recvs.append((self.pp.irecv(buffer, self.pp.prev_rank), buffer))

    def _step_patch(self, p: int, start: int, end: int, n_image: int, streams: Streams, full: Streams) -> torch.Tensor:
        """Last stage: head, guidance and scheduler step of one patch; returns its new latents."""
        if self._head is None:
            self._head = [torch.zeros_like(t) for t in full]
        self._head[0][:, start:end] = streams[0]
        for i in range(1, len(streams)):
            self._head[i] = streams[i]
        args, kwargs = self.manager.forward_call
        self._inject = tuple(self._head)
        try:  # the model's own head (plain forward: no hooks, so no new step and no CFG gather)
            output = self.transformer.forward(*args, **{**kwargs, "return_dict": False})[0]
        finally:
            self._inject = None
        output = latent_rows(output, start, end, n_image)
        if self.cfg_group is not None:
            output = self.cfg_group.all_gather(output.contiguous(), dim=0)
        prediction = self.adapter.prediction_from_output(output, self.transformer)
        if self.do_cfg:
            uncond, cond = prediction.chunk(2)
            prediction = uncond + self.guidance_scale * (cond - uncond)
        latents = latent_rows(self._latents, start, end, n_image)
        t = self.scheduler.timesteps[self.manager.step]
        new = self._schedulers[p].step(prediction, t, latents, **self.step_kwargs, return_dict=False)[0]
        latents.copy_(new)
        return latents.clone(memory_format=torch.contiguous_format)  # one copy: it outlives its send

    def refresh_kv(self, call: BlockCall) -> None:
        """Write this patch's K/V rows of a block the cache skips (K/V projections only: no
        attention, no MLP). Families without it keep the stale rows, with a warning."""
        if not self.adapter.supports_kv_refresh:
            warn_once(logger, f"PipeFusion: {self.adapter.family} blocks skipped by the cache keep stale K/V rows (no K/V refresh)")
            return
        self.context.refresh(lambda: self.adapter.patch_self_attention(call))

    @staticmethod
    def _bounds(n_image: int, patches: int) -> list[tuple[int, int]]:
        return [(p * n_image // patches, (p + 1) * n_image // patches) for p in range(patches)]

    # ------------------------------------------------------------------ the block path
    def run_block(self, index: int, block: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
        call = self.adapter.bind(block, args, kwargs)
        if self._inject is not None:  # the last stage re-running the head of one patch
            return self.adapter.pack_output(self._inject if index == 0 else call.streams)
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
        overlap = self.overlap and not warm
        patches = 1 if warm else self.num_patches
        if n_image % patches:
            raise ConfigError(f"{n_image} image tokens cannot be split into --num_pipeline_patch {patches} patches")
        receive = False  # stage 0: take each patch's latents from the last stage, not the model input
        if overlap and self._latents is None:  # first overlapped step: the model input is still true
            args, kwargs = m.forward_call
            self._start_overlap(args[0] if args else kwargs["hidden_states"], n_image, full[0])
        elif overlap and self.is_first:
            receive = True
            self._post_latent_recvs(n_image)
        arguments = dict(call0.bound.arguments)
        sends: list = []  # (work, tensor): a tensor must outlive its send
        outputs: list[Streams] = []
        for p, (start, end) in enumerate(self._bounds(n_image, patches)):
            m.use_slot("full" if warm else p)
            self.context.set_patch(start, end, n_image)
            local = [self._local(n, t, start, end) for n, t in zip(names, full)]
            if receive:  # this patch's latents, stepped by the last stage
                work, buffer = self._latent_recvs[p]
                pp.wait(work, "PipeFusion recv of patch latents")
                latent_rows(self._latents, start, end, n_image).copy_(buffer)
                local[0] = self._local(names[0], self._embed(n_image), start, end)
            n_local = local[0].shape[1]
            header_len = m.method.step_state_size(n_local)
            header = None
            produced: dict[int, torch.Tensor] = {}  # long-skip sources of this patch
            if self.is_first:
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
            if self.is_last:
                if overlap:
                    gathered = tuple(self._gather(n, t) for n, t in zip(names, x))
                    new_latents = self._step_patch(p, start, end, n_image, gathered, full)
                    if not self._final_step():  # stage 0 starts the next step on this patch
                        sends.append((pp.isend(new_latents, pp.next_rank), new_latents))
                else:
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
        if overlap:  # no end-of-step exchange: the last stage returns its full-image block outputs
            return tuple(self._head) if self.is_last else full
        if self.is_last:
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
    object.__setattr__(manager.transformer, BLOCKS_FREED, True)
    for index, (blocks, position) in enumerate(manager.slots):
        if not first <= index <= last:
            block = blocks[position]
            getattr(block, "block", block).to("meta")
