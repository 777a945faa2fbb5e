"""``xDiTParallel``: run a diffusers DiT pipeline under the parallel + cache configuration.

    engine, inputs = xFuserArgs.from_cli_args(ns).create_config()
    runner = xDiTParallel(pipe, engine, inputs)
    output = runner()            # every rank runs; images are complete on every rank of a replica
    runner.save("results")       # the replica's output rank writes its images

Per rank, the transformer is prepared once: CFG split hooks (cfg degree 2), USP attention
processors + sequence sharding on the block path (SP degree > 1), and a CacheManager whose
sync group is this rank's CFG x SP peers, so every cache decision is taken on reduced metrics
and is identical on every rank that shares a forward. Data parallel gives each replica its
share of the prompts. The denoising loop is the pipeline's own, shared by every model.
"""
from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from xfuser.config.config import ConfigError, EngineConfig, InputConfig, validate_engine_and_input
from xfuser.core.distributed import (
    get_cfg_group,
    get_cfg_sp_group,
    get_dp_group,
    get_pp_group,
    get_sp_group,
    get_world_group,
    init_distributed_environment,
    initialize_model_parallel,
    local_device,
    model_parallel_is_initialized,
)
from xfuser.logger import init_logger
from xfuser.memory import PeakMemory, peak_memory, reset_peak_memory
from xfuser.model_executor.cache.manager import CacheManager, check_installable
from xfuser.model_executor.cache.sync import CoordinatorSync
from xfuser.model_executor.layers.pipefusion_attention import PatchKVContext
from xfuser.model_executor.models.cfg_parallel import CFGSplit
from xfuser.model_executor.models.pipefusion import PatchPipeline, free_foreign_blocks, stage_ranges
from xfuser.model_executor.models.sequence_parallel import SequenceShard, check_sequence_parallel
from xfuser.model_executor.pipelines.call_args import (
    accepts, call_default, prepare_call_kwargs, requested_samples, schedule_length_of, scheduled_steps,
)
from xfuser.model_executor.pipelines.fastcache_pipeline import check_method_supported, xFuserFastCachePipelineWrapper
from xfuser.model_executor.pipelines.input_checks import check_call_inputs, input_call_kwargs
from xfuser.model_executor.pipelines.input_warnings import warn_unusual_inputs
from xfuser.model_executor.pipelines.memory_options import check_memory_options, place_pipeline
from xfuser.seeding import sample_generators
from xfuser.timing import timed

logger = init_logger(__name__)

def snapshot_attention(transformer) -> list[tuple[Any, str, Any]]:
    """Every attention module's processor (diffusers) or core (StepVideo), to restore later."""
    out = []
    for module in transformer.modules():
        for attr in ("processor", "attention_core"):
            if hasattr(module, attr):
                out.append((module, attr, getattr(module, attr)))
    return out


def restore_attention(snapshot: list[tuple[Any, str, Any]]) -> None:
    for module, attr, value in snapshot:
        if attr == "processor" and hasattr(module, "set_processor"):
            module.set_processor(value)
        else:
            setattr(module, attr, value)


def _has_cfg(pipe) -> bool:
    return accepts(pipe, "guidance_scale") and accepts(pipe, "negative_prompt") and not hasattr(pipe.transformer.config, "guidance_embeds")


def _take_over(wrapper: xFuserFastCachePipelineWrapper, engine: EngineConfig) -> tuple[Any, EngineConfig]:
    """Upstream's ``xDiTParallel(fastcache_wrapper, engine_config, input_config)``: the wrapper's
    cache settings (when it has a cache enabled) replace the engine's, and the wrapper is closed
    so that the runner installs the cache on the bare pipeline, under its parallel layout."""
    config = wrapper.cache_config if wrapper.manager is not None else None
    wrapper.close()
    if config is not None:
        if engine.cache_config.enabled and engine.cache_config != config:
            logger.info("xDiTParallel: the wrapper's cache (%s) replaces the engine's (%s)", config.method,
                        engine.cache_config.method)
        engine = dataclasses.replace(engine, cache_config=config)
    return wrapper.pipe, engine


class xDiTParallel:  # noqa: N801 - public name from xDiT
    def __init__(self, pipe, engine_config: EngineConfig, input_config: InputConfig) -> None:
        if isinstance(pipe, xFuserFastCachePipelineWrapper):
            pipe, engine_config = _take_over(pipe, engine_config)
        self.pipe = pipe
        self.engine = engine_config
        self.inputs = input_config
        validate_engine_and_input(engine_config, input_config)  # configs built by hand get the CLI's checks
        p = engine_config.parallel_config
        if p.use_parallel_vae and p.cfg_degree * p.sp_degree < 2:
            raise ConfigError(
                "--use_parallel_vae needs at least 2 ranks per replica in CFG x SP to split the decode over "
                "(PipeFusion stages are not used for it)"
            )
        transformer = pipe.transformer
        check_installable(transformer)
        adapter = check_method_supported(transformer, engine_config.cache_config)
        if p.sp_degree > 1:
            check_sequence_parallel(adapter, transformer, p.ulysses_degree)
        self.stages = self._check_pipefusion(adapter) if p.pp_degree > 1 else None
        if p.cfg_degree > 1:
            if not _has_cfg(pipe):
                raise ConfigError(f"--use_cfg_parallel: {type(pipe).__name__} does not use classifier-free guidance")
        self._check_token_counts(adapter)
        check_call_inputs(pipe, input_call_kwargs(pipe, input_config))  # the whole request, before any group exists
        runtime = engine_config.runtime_config
        if runtime.use_torch_compile:
            from xfuser.model_executor.compile import check_compilable

            check_compilable()
        if p.sp_degree > 1:  # a kernel this device or dtype cannot run fails here, with the flag
            from xfuser.core.attention.usp import set_attention_backend

            dtype = next(transformer.parameters()).dtype
            set_attention_backend(runtime.attention_backend, local_device(), p.ring_degree, dtype)
        elif runtime.attention_backend != "auto":
            logger.warning("--attention_backend %s applies to USP attention only; one SP rank uses diffusers' own attention",
                           runtime.attention_backend)

        init_distributed_environment(timeout_s=engine_config.runtime_config.collective_timeout_s)
        if not model_parallel_is_initialized():
            initialize_model_parallel(
                dp_degree=p.dp_degree, cfg_degree=p.cfg_degree, pp_degree=p.pp_degree,
                ulysses_degree=p.ulysses_degree, ring_degree=p.ring_degree,
                timeout_s=engine_config.runtime_config.collective_timeout_s,
            )
        self.device = local_device()
        check_memory_options(pipe, runtime, self.device, p.use_parallel_vae)
        place_pipeline(pipe, runtime, self.device)
        if not get_world_group().is_last_rank:
            pipe.set_progress_bar_config(disable=True)  # one progress bar per job, on the last rank

        self._closed = False
        self._attention = snapshot_attention(transformer)  # what close() restores
        self._vae_decoder = getattr(getattr(pipe, "vae", None), "decoder", None)
        if p.use_parallel_vae:
            self._parallelize_vae()
        self.adapter = adapter
        self.cfg_split = CFGSplit(transformer, get_cfg_group()) if p.cfg_degree > 1 else None
        self.sync = CoordinatorSync(get_cfg_sp_group(), batch=get_cfg_group(), seq=get_sp_group())
        self.patch_context = None
        if p.pp_degree > 1:
            self.patch_context = PatchKVContext(sp_group=get_sp_group())
            adapter.install_pipefusion_processors(transformer, self.patch_context)
        elif p.sp_degree > 1:
            adapter.install_usp_processors(transformer)
        self.manager: CacheManager | None = None
        self.enable_cache(engine_config.cache_config)
        if p.pp_degree > 1:  # once, after the cache path exists: each stage keeps only its own blocks
            free_foreign_blocks(self.manager, self.stages, get_pp_group().rank_in_group)
        if runtime.use_torch_compile:  # after the cache path: CachedBlock wrappers stay eager
            from xfuser.model_executor.compile import compile_blocks

            compile_blocks(transformer, adapter)
        self.output = None
        self.latency_s: float | None = None
        self.peak_memory: PeakMemory | None = None

    def _check_pipefusion(self, adapter) -> list[tuple[int, int]]:
        """PipeFusion errors a user can fix, raised before any compute; returns the stages."""
        p, pipe = self.engine.parallel_config, self.pipe
        name = type(pipe.transformer).__name__
        if not adapter.supports_pipefusion:
            raise ConfigError(f"--pipefusion_parallel_degree: PipeFusion is not implemented for {name} (supported: PixArt-α/Σ, Flux.1, HunyuanDiT)")
        if p.ring_degree > 1:
            raise ConfigError("--ring_degree > 1 with --pipefusion_parallel_degree > 1 is not supported; use --ulysses_degree for the SP part")
        if self.engine.runtime_config.warmup_steps < 1:
            raise ConfigError("--warmup_steps must be >= 1 with PipeFusion: the first full-image step fills the stale K/V buffers")
        stages = stage_ranges(len(adapter.blocks(pipe.transformer)), p.pp_degree, p.attn_layer_num_for_pp)
        per_replica = len(self.inputs.prompt) // p.dp_degree
        if self.engine.cache_config.enabled and per_replica > 1:
            raise ConfigError(
                f"--cache_method {self.engine.cache_config.method} under PipeFusion takes one prompt per replica, got "
                f"{per_replica}: per-image cache decisions are not implemented for the patch pipeline; raise "
                "--data_parallel_degree to one prompt per replica, or use --cache_method None"
            )
        kwargs = prepare_call_kwargs(pipe, self.inputs.height, self.inputs.width)
        if "height" in kwargs and "width" in kwargs:
            scale = getattr(pipe, "vae_scale_factor", 8)
            patch = 2 if adapter.family == "flux" else (getattr(pipe.transformer.config, "patch_size", 1) or 1)
            rows, cols = kwargs["height"] // scale // patch, kwargs["width"] // scale // patch
            if rows % p.num_pipeline_patch:
                raise ConfigError(
                    f"--height {kwargs['height']} gives {rows} rows of tokens, not divisible into --num_pipeline_patch "
                    f"{p.num_pipeline_patch} patches; use a height that is a multiple of {scale * patch * p.num_pipeline_patch}"
                )
            if (rows // p.num_pipeline_patch * cols) % p.sp_degree:
                raise ConfigError(
                    f"a patch of {rows // p.num_pipeline_patch}x{cols} tokens cannot be split over the sequence-parallel "
                    f"degree {p.sp_degree}; change --height/--width, --num_pipeline_patch or --ulysses_degree"
                )
        return stages

    def _parallelize_vae(self) -> None:
        """distvae's patch-parallel decoder over the replica's ranks (they all hold the same
        final latents, so each decodes a band of the image and the bands are gathered)."""
        from distvae.vae.parallel import parallelize_decoder

        vae = getattr(self.pipe, "vae", None)
        if vae is None:
            raise ConfigError("--use_parallel_vae: this pipeline has no VAE")
        try:
            parallelize_decoder(vae, get_cfg_sp_group().group)
        except ValueError as exc:
            raise ConfigError(f"--use_parallel_vae: {exc}") from exc

    def _check_token_counts(self, adapter) -> None:
        """Sizes whose token count cannot be split over the SP ranks fail here, not mid-run."""
        p, inputs, pipe = self.engine.parallel_config, self.inputs, self.pipe
        if p.sp_degree == 1:
            return
        kwargs = prepare_call_kwargs(pipe, inputs.height, inputs.width)
        scale = getattr(pipe, "vae_scale_factor", 8)
        patch = getattr(pipe.transformer.config, "patch_size", 1) or 1
        if "height" in kwargs and "width" in kwargs:
            h, w = kwargs["height"] // scale // patch, kwargs["width"] // scale // patch
            if (h * w) % p.sp_degree:
                raise ConfigError(
                    f"{kwargs['height']}x{kwargs['width']} gives {h * w} image tokens, not divisible by the "
                    f"sequence-parallel degree {p.sp_degree}; change --height/--width or the degrees"
                )
        if "encoder_hidden_states" in adapter.sp_split_streams:
            n_text = inputs.max_sequence_length or call_default(pipe, "max_sequence_length") or 512
            if n_text % p.sp_degree:
                raise ConfigError(
                    f"--max_sequence_length {n_text}: the text stream is split over the sequence-parallel ranks and "
                    f"{n_text} tokens are not divisible by the degree {p.sp_degree}; use a multiple of {p.sp_degree}"
                )

    def enable_cache(self, cache_config) -> None:
        """(Re)install the block path with ``cache_config`` (method ``None`` = no caching)."""
        transformer = self.pipe.transformer
        check_method_supported(transformer, cache_config)
        if self.manager is not None:
            self.manager.uninstall()
        self.manager = CacheManager(transformer, cache_config, sync=self.sync, adapter=self.adapter,
                                    schedule_length=schedule_length_of(self.pipe)).install(freed_ok=True)
        p = self.engine.parallel_config
        if p.pp_degree > 1:
            pp = get_pp_group()
            PatchPipeline(
                self.manager, self.adapter, pp, get_sp_group(), self.stages, p.num_pipeline_patch,
                self.engine.runtime_config.warmup_steps, self.patch_context,
                step_overlap=self.engine.runtime_config.pipefusion_step_overlap,
            )
        elif p.sp_degree > 1:
            self.manager.sequence_shard = SequenceShard(self.adapter, get_sp_group(), self.manager.num_blocks)

    # ------------------------------------------------------------------ running
    def _local_range(self) -> tuple[int, int]:
        """[first, end) of this replica's prompts in the request (data parallel)."""
        dp = get_dp_group()
        per = len(self.inputs.prompt) // dp.world_size
        return dp.rank_in_group * per, (dp.rank_in_group + 1) * per

    def local_prompts(self) -> list[str]:
        """This replica's share of the prompts (data parallel)."""
        first, end = self._local_range()
        return self.inputs.prompt[first:end]

    def call_kwargs(self, **overrides: Any) -> dict[str, Any]:
        # the whole request's arguments (what __init__ checked), then this replica's share of it
        kwargs = input_call_kwargs(self.pipe, self.inputs)
        kwargs.update(prompt=self.local_prompts(), output_type=self.inputs.output_type)
        negative = kwargs.get("negative_prompt")
        if isinstance(negative, list) and len(negative) > 1:  # one per prompt: sliced like the prompts
            first, end = self._local_range()
            kwargs["negative_prompt"] = negative[first:end]
        kwargs.update(overrides)
        check_call_inputs(self.pipe, kwargs)
        warn_unusual_inputs(self.pipe, kwargs)
        if "generator" not in kwargs:
            # one generator per image, seeded by its index in the whole request (xfuser/seeding.py):
            # identical latents on every rank of a replica, and an image that depends only on
            # (prompt, seed, index) -- not on its batch-mates or the data-parallel degree
            first, end = self._local_range()
            if "prompt" in overrides:  # upstream's runner(prompt=...): the call's prompts, indexed from 0
                prompt = overrides["prompt"]
                first, end = 0, 1 if isinstance(prompt, str) else len(prompt)
            per_prompt = int(kwargs.get("num_images_per_prompt") or 1)
            kwargs["generator"] = sample_generators(self.inputs.seed, end - first, first, per_prompt)
        return kwargs

    def __call__(self, **overrides: Any):
        kwargs = self.call_kwargs(**overrides)
        self.manager.reset(scheduled_steps(self.pipe, (), kwargs), requested_samples(self.pipe, (), kwargs))
        scheduler_hold = self._begin_patch_generation(kwargs) if self.manager.patch_pipeline is not None else nullcontext()
        reset_peak_memory(self.device)
        with scheduler_hold:
            # time on the rank's device, not the weights': under CPU offload they sit on the host
            self.output, self.latency_s = timed(lambda: self.pipe(**kwargs), self.device)
        self.peak_memory = peak_memory(self.device)
        if self.manager.debug_agreement:
            self.manager.sync.verify_same(self.manager.decision_log())
        if self.manager.patch_pipeline is not None:
            self.manager.patch_pipeline.merge_stage_statistics()
        return self.output

    def _begin_patch_generation(self, kwargs: dict[str, Any]):
        """Tell the patch pipeline what the pipeline's loop will do between transformer calls
        (guidance, scheduler step arguments), so its last stage can step patches itself."""
        pipe = self.pipe
        scale = kwargs.get("guidance_scale", call_default(pipe, "guidance_scale"))
        do_cfg = _has_cfg(pipe) and scale is not None and scale > 1.0
        step_kwargs = {}
        if hasattr(pipe, "prepare_extra_step_kwargs"):
            step_kwargs = pipe.prepare_extra_step_kwargs(kwargs.get("generator"), kwargs.get("eta", 0.0))
        return self.manager.patch_pipeline.begin_generation(
            pipe.scheduler, scale, do_cfg, get_cfg_group(), step_kwargs,
            guidance_rescale=kwargs.get("guidance_rescale", call_default(pipe, "guidance_rescale") or 0.0),
        )

    def close(self) -> None:
        """Undo what this runner installed on the pipeline: the cache blocks, the CFG hooks, the
        USP/PipeFusion attention processors and the parallel VAE decoder, so another runner or
        wrapper may take the pipeline (process groups stay: they belong to the process, see
        ``destroy_distributed_environment``). After PipeFusion the other stages' blocks were
        freed, so that pipeline must be reloaded before anything else runs it."""
        if self._closed:
            return
        self._closed = True
        if self.manager is not None:
            self.manager.uninstall()
        if self.cfg_split is not None:
            self.cfg_split.remove()
        restore_attention(self._attention)
        vae = getattr(self.pipe, "vae", None)
        if self._vae_decoder is not None and vae is not None:
            vae.decoder = self._vae_decoder

    def __enter__(self) -> "xDiTParallel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def get_cache_statistics(self) -> dict[str, Any]:
        """The manager's statistics of the last call, plus this rank's peak memory during it."""
        stats = self.manager.statistics()
        if self.peak_memory is not None:
            stats["peak_memory"] = self.peak_memory.as_dict()
        return stats

    @property
    def is_output_rank(self) -> bool:
        """One rank per replica writes results: the first of its CFG x SP group, on the last
        PipeFusion stage."""
        return get_cfg_sp_group().is_first_rank and get_pp_group().is_last_rank

    def save(self, directory: str | Path = "results", prefix: str = "xdit", fps: int = 8) -> list[str]:
        """Images as PNG, videos (pipelines returning ``frames``) as GIF; latents are not saved."""
        if self.output is None or not self.is_output_rank or self.inputs.output_type != "pil":
            return []
        items = getattr(self.output, "images", None)
        video = items is None
        if video:
            items = getattr(self.output, "frames", None)
            if items is None:
                return []
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        dp = get_dp_group()
        paths = []
        for i, item in enumerate(items):
            suffix = f"_dp{dp.rank_in_group}_{i}" if dp.world_size > 1 or len(items) > 1 else ""
            if video:
                from diffusers.utils import export_to_gif

                paths.append(export_to_gif(list(item), str(directory / f"{prefix}{suffix}.gif"), fps=fps))
            else:
                path = directory / f"{prefix}{suffix}.png"
                item.save(path)
                paths.append(str(path))
        return paths
