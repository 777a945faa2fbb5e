"""``xFuserArgs``: xDiT's command-line flags -> validated (EngineConfig, InputConfig).

Every flag is accepted as ``--flag_name`` and ``--flag-name``.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field

from xfuser.config.config import (
    APPROXIMATIONS,
    ATTENTION_BACKENDS,
    CACHE_METHODS,
    DTYPES,
    OUTPUT_TYPES,
    CacheConfig,
    ConfigError,
    EngineConfig,
    InputConfig,
    ModelConfig,
    ParallelConfig,
    RuntimeConfig,
    validate_engine_and_input,
)
from xfuser.config.defaults import DEFAULT_MODEL
from xfuser.config.model_files import check_model_files


def _add(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    flags = [f"--{name}"]
    if "_" in name:
        flags.append(f"--{name.replace('_', '-')}")
    kwargs.setdefault("dest", name)
    parser.add_argument(*flags, **kwargs)


def _shown(default) -> str:
    return " ".join(map(str, default)) if isinstance(default, list) else str(default)


def _resolve_world_size(world_size: int | None) -> int:
    """The explicit value, else the initialised process group's, else torchrun's ``WORLD_SIZE``."""
    if world_size is None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            world_size = dist.get_world_size()
        else:
            raw = os.environ.get("WORLD_SIZE", "1")
            try:
                world_size = int(raw)
            except ValueError as exc:
                raise ConfigError(f"WORLD_SIZE={raw!r} is not an integer; launch with torchrun or unset it") from exc
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"world size must be an integer >= 1 (torchrun --nproc_per_node), got {world_size!r}")
    return world_size


def _default(cls: type, name: str):
    """The default of field ``name`` of config dataclass ``cls``: where a flag's default comes
    from, so the CLI, ``xFuserArgs`` and the configs cannot disagree."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _flag(default, group: str, help: str, **cli):  # noqa: A002 - argparse's own word
    """A field that is also a CLI flag: ``help`` (the default is appended unless it is None,
    empty or False) and argparse options ``cli`` (type, choices, nargs, ...) live beside the default."""
    meta = {"group": group, "help": help, "cli": cli}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


MODEL, PARALLEL, MEMORY, CACHE = "model and input", "parallelism", "memory", "caching"


@dataclass
class xFuserArgs:  # noqa: N801 - public name from xDiT
    """One field per CLI flag: its default (taken from the config dataclass it feeds), help and
    parser options are declared here once, and ``add_cli_args`` generates the parser from them.

    Kept flat like xDiT's so scripts can build it from argparse or by hand; ``create_config``
    turns it into validated configs so bad launches fail before any weights load.
    """

    model: str = _flag(DEFAULT_MODEL, MODEL, "diffusers model dir or hub id (default: the embedded trained model)")
    dtype: str = _flag(_default(ModelConfig, "dtype"), MODEL, "weights/compute dtype; auto = float32 on CPU, the "
                       "checkpoint's half precision or bfloat16 on a GPU", choices=DTYPES)
    height: int | None = _flag(_default(InputConfig, "height"), MODEL, "image height in pixels (default: the model's "
                               "native size)", type=int)
    width: int | None = _flag(_default(InputConfig, "width"), MODEL, "image width in pixels (default: the model's "
                              "native size)", type=int)
    num_frames: int | None = _flag(_default(InputConfig, "num_frames"), MODEL, "frames (video models)", type=int)
    prompt: list[str] = _flag(_default(InputConfig, "prompt"), MODEL, "one or more prompts", nargs="+")
    negative_prompt: str | list[str] = _flag(_default(InputConfig, "negative_prompt"), MODEL,
                                             "negative prompt (needs --guidance_scale > 1 where it is given)")
    num_inference_steps: int = _flag(_default(InputConfig, "num_inference_steps"), MODEL, "denoising steps", type=int)
    guidance_scale: float | None = _flag(_default(InputConfig, "guidance_scale"), MODEL,
                                         "CFG scale (default: the pipeline's)", type=float)
    seed: int = _flag(_default(InputConfig, "seed"), MODEL, "generator seed; image i of a request draws seed + i",
                      type=int)
    output_type: str = _flag(_default(InputConfig, "output_type"), MODEL, "output type; the examples save pil as "
                             "PNG/GIF, np as .npy, pt/latent as .pt", choices=OUTPUT_TYPES)
    max_sequence_length: int | None = _flag(_default(InputConfig, "max_sequence_length"), MODEL,
                                            "text tokens, at most the text encoder's limit (default: the pipeline's)",
                                            type=int)
    warmup_steps: int = _flag(_default(RuntimeConfig, "warmup_steps"), PARALLEL,
                              "PipeFusion synchronous warm-up steps", type=int)
    pipefusion_sync_steps: bool = _flag(not _default(RuntimeConfig, "pipefusion_step_overlap"), PARALLEL,
                                        "PipeFusion: drain the patch pipeline every step instead of overlapping "
                                        "steps (same result, slower)")
    data_parallel_degree: int = _flag(_default(ParallelConfig, "dp_degree"), PARALLEL, "data-parallel replicas",
                                      type=int)
    use_cfg_parallel: bool = _flag(False, PARALLEL, "cond/uncond branches on different ranks")
    ulysses_degree: int = _flag(_default(ParallelConfig, "ulysses_degree"), PARALLEL,
                                "Ulysses sequence-parallel degree", type=int)
    ring_degree: int = _flag(_default(ParallelConfig, "ring_degree"), PARALLEL, "Ring sequence-parallel degree",
                             type=int)
    pipefusion_parallel_degree: int = _flag(_default(ParallelConfig, "pp_degree"), PARALLEL, "PipeFusion stages",
                                            type=int)
    num_pipeline_patch: int | None = _flag(_default(ParallelConfig, "num_pipeline_patch"), PARALLEL,
                                           "PipeFusion patches (default: the degree)", type=int)
    attn_layer_num_for_pp: list[int] | None = _flag(_default(ParallelConfig, "attn_layer_num_for_pp"), PARALLEL,
                                                    "blocks per PipeFusion stage (default: an even split)",
                                                    type=int, nargs="+")
    use_parallel_vae: bool = _flag(_default(ParallelConfig, "use_parallel_vae"), PARALLEL,
                                   "patch-parallel VAE decode (distvae)")
    use_torch_compile: bool = _flag(_default(RuntimeConfig, "use_torch_compile"), PARALLEL,
                                    "torch.compile each transformer block once (regional compilation; cache "
                                    "decisions and SP exchanges stay eager)")
    attention_backend: str = _flag(_default(RuntimeConfig, "attention_backend"), PARALLEL,
                                   "USP attention kernel: auto = flash-attn on CUDA when installed, else torch "
                                   "SDPA; cpu on CPU", choices=ATTENTION_BACKENDS)
    collective_timeout: float = _flag(_default(RuntimeConfig, "collective_timeout_s"), PARALLEL,
                                      "seconds a collective may wait for its peers before the run ends naming the "
                                      "group, operation and peers (start-up, while peers load the model, may wait "
                                      "600: XFUSER_STARTUP_TIMEOUT)", type=float)
    enable_tiling: bool = _flag(_default(RuntimeConfig, "vae_tiling"), MEMORY,
                                "decode the latents in VAE tiles (diffusers' vae.enable_tiling)")
    enable_slicing: bool = _flag(_default(RuntimeConfig, "vae_slicing"), MEMORY,
                                 "decode one sample at a time (diffusers' vae.enable_slicing)")
    enable_model_cpu_offload: bool = _flag(False, MEMORY, "keep each model on the CPU until it runs (diffusers' "
                                           "enable_model_cpu_offload; one process only)")
    enable_sequential_cpu_offload: bool = _flag(False, MEMORY, "stream every submodule to the GPU as it runs: least "
                                                "memory, slowest (one process only)")
    # None: Fast, unless --use_teacache / --use_fbcache. The one default that differs from its
    # config on purpose: the product runs FastCache, while a bare CacheConfig() caches nothing.
    cache_method: str | None = _flag(None, CACHE, "cache method (default: Fast)", choices=CACHE_METHODS)
    use_teacache: bool = _flag(False, CACHE, "xDiT's spelling of --cache_method Tea")
    use_fbcache: bool = _flag(False, CACHE, "xDiT's spelling of --cache_method Fb")
    cache_ratio_threshold: float = _flag(_default(CacheConfig, "cache_ratio_threshold"), CACHE,
                                         "main threshold of every method; larger skips more", type=float)
    motion_threshold: float = _flag(_default(CacheConfig, "motion_threshold"), CACHE,
                                    "FastCache static-token threshold; 0 disables", type=float)
    significance_level: float = _flag(_default(CacheConfig, "significance_level"), CACHE,
                                      "FastCache χ² test α; smaller skips more", type=float)
    cache_warmup_steps: int = _flag(_default(CacheConfig, "cache_warmup_steps"), CACHE,
                                    "first steps that always compute", type=int)
    max_cached_steps: int = _flag(_default(CacheConfig, "max_cached_steps"), CACHE,
                                  "max consecutive cached steps, -1 = no cap", type=int)
    approximation: str = _flag(_default(CacheConfig, "approximation"), CACHE,
                               "FastCache's stand-in for a skipped block: learned (calibrated forecast; extrapolate "
                               "when the model has no calibration) | extrapolate (first-order forecast) | reuse | "
                               "fitted | auto", choices=APPROXIMATIONS)
    fastcache_calibration: str | None = _flag(_default(CacheConfig, "calibration"), CACHE,
                                              "FastCache calibration file from `python -m "
                                              "xfuser.model_executor.cache.calibrate --method Fast` (default: "
                                              "fastcache.safetensors beside the model)")
    tea_coefficients: str | None = _flag(None, CACHE, "JSON file from the calibrate command (TeaCache)")
    debug_cache_agreement: bool = _flag(_default(CacheConfig, "debug_cache_agreement"), CACHE,
                                        "verify cache decisions match on all ranks (one gather per step)")

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """Add every field as ``--name`` (and ``--name-with-dashes``), grouped as declared."""
        groups: dict[str, argparse._ArgumentGroup] = {}
        for f in dataclasses.fields(cls):
            meta = f.metadata
            group = groups.get(meta["group"]) or groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if default is False:
                _add(group, f.name, action="store_true", help=meta["help"])
                continue
            shown = "" if default in (None, "") or "(default" in meta["help"] else f" (default: {_shown(default)})"
            _add(group, f.name, default=default, help=meta["help"] + shown, **meta["cli"])
        return parser

    @classmethod
    def from_cli_args(cls, ns: argparse.Namespace) -> "xFuserArgs":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(ns).items() if k in names})

    def resolved_cache_method(self) -> str:
        """``--cache_method``, or the method xDiT's ``--use_teacache`` / ``--use_fbcache`` name
        (an explicit, different ``--cache_method`` beside them is a contradiction, not a choice)."""
        aliases = [m for flag, m in (("use_teacache", "Tea"), ("use_fbcache", "Fb")) if getattr(self, flag)]
        if len(aliases) > 1:
            raise ConfigError("--use_teacache and --use_fbcache name different cache methods; give one of them")
        if not aliases:
            return "Fast" if self.cache_method is None else self.cache_method
        if self.cache_method is not None and str(self.cache_method).lower() != aliases[0].lower():
            flag = "--use_teacache" if aliases[0] == "Tea" else "--use_fbcache"
            raise ConfigError(f"{flag} means --cache_method {aliases[0]}, but --cache_method {self.cache_method} was given; drop one")
        return aliases[0]

    def cpu_offload(self) -> str:
        if self.enable_model_cpu_offload and self.enable_sequential_cpu_offload:
            raise ConfigError("--enable_model_cpu_offload and --enable_sequential_cpu_offload exclude each other; give one")
        return "model" if self.enable_model_cpu_offload else "sequential" if self.enable_sequential_cpu_offload else "none"

    def create_config(self, world_size: int | None = None) -> tuple[EngineConfig, InputConfig]:
        """Validate everything and build the configs (no model is touched)."""
        world_size = _resolve_world_size(world_size)
        cache_method = self.resolved_cache_method()
        cpu_offload = self.cpu_offload()
        if cpu_offload != "none" and world_size > 1:
            raise ConfigError(
                f"--enable_{cpu_offload}_cpu_offload moves models between the CPU and one GPU and cannot be combined with "
                f"{world_size} processes; drop the flag or run one process"
            )
        tea = None
        if self.tea_coefficients:
            from xfuser.model_executor.cache.calibrate import load_coefficients

            try:
                tea = load_coefficients(self.tea_coefficients)
            except (OSError, KeyError, ValueError) as exc:
                raise ConfigError(f"--tea_coefficients {self.tea_coefficients}: cannot read coefficients ({exc})") from exc
        parallel = ParallelConfig(
            dp_degree=self.data_parallel_degree,
            cfg_degree=2 if self.use_cfg_parallel else 1,
            ulysses_degree=self.ulysses_degree,
            ring_degree=self.ring_degree,
            pp_degree=self.pipefusion_parallel_degree,
            num_pipeline_patch=self.num_pipeline_patch,
            attn_layer_num_for_pp=self.attn_layer_num_for_pp,
            use_parallel_vae=self.use_parallel_vae,
        )
        parallel.validate_world_size(world_size)
        engine = EngineConfig(
            model_config=ModelConfig(self.model, self.dtype),
            runtime_config=RuntimeConfig(
                warmup_steps=self.warmup_steps,
                pipefusion_step_overlap=not self.pipefusion_sync_steps,
                use_torch_compile=self.use_torch_compile,
                attention_backend=self.attention_backend,
                vae_tiling=self.enable_tiling,
                vae_slicing=self.enable_slicing,
                cpu_offload=cpu_offload,
                collective_timeout_s=self.collective_timeout,
            ),
            parallel_config=parallel,
            cache_config=CacheConfig(
                method=cache_method,
                cache_ratio_threshold=self.cache_ratio_threshold,
                motion_threshold=self.motion_threshold,
                significance_level=self.significance_level,
                cache_warmup_steps=self.cache_warmup_steps,
                max_cached_steps=self.max_cached_steps,
                approximation=self.approximation,
                calibration=self.fastcache_calibration,
                tea_coefficients=tea,
                debug_cache_agreement=self.debug_cache_agreement,
            ),
        )
        inputs = InputConfig(
            prompt=[self.prompt] if isinstance(self.prompt, str) else list(self.prompt),
            negative_prompt=self.negative_prompt,
            height=self.height,
            width=self.width,
            num_frames=self.num_frames,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            seed=self.seed,
            output_type=self.output_type,
            max_sequence_length=self.max_sequence_length,
        )
        validate_engine_and_input(engine, inputs)
        check_model_files(self.model, inputs)  # the checkpoint's JSON files, where on this machine
        return engine, inputs
