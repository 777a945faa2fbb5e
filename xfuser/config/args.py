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


def _add(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    flags = [f"--{name}"]
    if "_" in name:
        flags.append(f"--{name.replace('_', '-')}")
    kwargs.setdefault("dest", name)
    parser.add_argument(*flags, **kwargs)


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


@dataclass
class xFuserArgs:  # noqa: N801 - public name from xDiT
    """One field per CLI flag (same name, same default; see ``add_cli_args`` for each effect).

    Kept flat like xDiT's so scripts can build it from argparse or by hand; ``create_config``
    turns it into validated configs so bad launches fail before any weights load.
    """

    model: str = DEFAULT_MODEL
    dtype: str = "auto"
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    prompt: list[str] = field(default_factory=lambda: ["a red circle on a blue background, top left"])
    negative_prompt: str | list[str] = ""
    num_inference_steps: int = 20
    guidance_scale: float | None = None
    seed: int = 42
    output_type: str = "pil"
    max_sequence_length: int | None = None
    warmup_steps: int = 1
    pipefusion_sync_steps: bool = False
    data_parallel_degree: int = 1
    use_cfg_parallel: bool = False
    ulysses_degree: int = 1
    ring_degree: int = 1
    pipefusion_parallel_degree: int = 1
    num_pipeline_patch: int | None = None
    attn_layer_num_for_pp: list[int] | None = None
    use_parallel_vae: bool = False
    use_torch_compile: bool = False
    attention_backend: str = "auto"
    enable_tiling: bool = False
    enable_slicing: bool = False
    enable_model_cpu_offload: bool = False
    enable_sequential_cpu_offload: bool = False
    collective_timeout: float = 120.0
    cache_method: str | None = None  # None: Fast, unless --use_teacache / --use_fbcache
    use_teacache: bool = False
    use_fbcache: bool = False
    cache_ratio_threshold: float = 0.05
    motion_threshold: float = 0.1
    significance_level: float = 0.05
    cache_warmup_steps: int = 1
    max_cached_steps: int = -1
    approximation: str = "learned"
    fastcache_calibration: str | None = None
    tea_coefficients: str | None = None
    debug_cache_agreement: bool = False

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        g = parser.add_argument_group("model and input")
        _add(g, "model", default=DEFAULT_MODEL, help="diffusers model dir or hub id (default: the embedded trained model)")
        _add(g, "dtype", default="auto", choices=DTYPES,
             help="weights/compute dtype; auto = float32 on CPU, the checkpoint's half precision or bfloat16 on a GPU (auto)")
        _add(g, "height", type=int, default=None, help="image height in pixels (default: model's native size)")
        _add(g, "width", type=int, default=None, help="image width in pixels (default: model's native size)")
        _add(g, "num_frames", type=int, default=None, help="frames (video models)")
        _add(g, "prompt", nargs="+", default=["a red circle on a blue background, top left"], help="one or more prompts")
        _add(g, "negative_prompt", default="", help="negative prompt (needs --guidance_scale > 1 where it is given)")
        _add(g, "num_inference_steps", type=int, default=20, help="denoising steps (20)")
        _add(g, "guidance_scale", type=float, default=None, help="CFG scale (default: the pipeline's)")
        _add(g, "seed", type=int, default=42, help="generator seed (42)")
        _add(g, "output_type", default="pil", choices=["pil", "np", "pt", "latent"],
             help="output type; the examples save pil as PNG/GIF, np as .npy, pt/latent as .pt (pil)")
        _add(g, "max_sequence_length", type=int, default=None,
             help="text tokens, at most the text encoder's limit (default: the pipeline's)")
        p = parser.add_argument_group("parallelism")
        _add(p, "warmup_steps", type=int, default=1, help="PipeFusion synchronous warm-up steps (1)")
        _add(p, "pipefusion_sync_steps", action="store_true",
             help="PipeFusion: drain the patch pipeline every step instead of overlapping steps (same result, slower)")
        _add(p, "data_parallel_degree", type=int, default=1, help="data-parallel replicas (1)")
        _add(p, "use_cfg_parallel", action="store_true", help="cond/uncond branches on different ranks")
        _add(p, "ulysses_degree", type=int, default=1, help="Ulysses sequence-parallel degree (1)")
        _add(p, "ring_degree", type=int, default=1, help="Ring sequence-parallel degree (1)")
        _add(p, "pipefusion_parallel_degree", type=int, default=1, help="PipeFusion stages (1)")
        _add(p, "num_pipeline_patch", type=int, default=None, help="PipeFusion patches (default: the degree)")
        _add(p, "attn_layer_num_for_pp", type=int, nargs="+", default=None, help="blocks per PipeFusion stage")
        _add(p, "use_parallel_vae", action="store_true", help="patch-parallel VAE decode (distvae)")
        _add(p, "use_torch_compile", action="store_true",
             help="torch.compile each transformer block once (regional compilation; cache decisions and SP exchanges stay eager)")
        _add(p, "attention_backend", default="auto", choices=ATTENTION_BACKENDS,
             help="USP attention kernel: auto = flash-attn on CUDA when installed, else torch SDPA; cpu on CPU (auto)")
        m = parser.add_argument_group("memory")
        _add(m, "enable_tiling", action="store_true", help="decode the latents in VAE tiles (diffusers' vae.enable_tiling)")
        _add(m, "enable_slicing", action="store_true", help="decode one sample at a time (diffusers' vae.enable_slicing)")
        _add(m, "enable_model_cpu_offload", action="store_true",
             help="keep each model on the CPU until it runs (diffusers' enable_model_cpu_offload; one process only)")
        _add(m, "enable_sequential_cpu_offload", action="store_true",
             help="stream every submodule to the GPU as it runs: least memory, slowest (one process only)")
        _add(p, "collective_timeout", type=float, default=120.0,
             help="seconds a collective may wait for its peers before the run ends naming the group, operation and "
                  "peers (120; start-up, while peers load the model, may wait 600: XFUSER_STARTUP_TIMEOUT)")
        c = parser.add_argument_group("caching")
        _add(c, "cache_method", default=None, choices=CACHE_METHODS, help="cache method (Fast)")
        _add(c, "use_teacache", action="store_true", help="xDiT's spelling of --cache_method Tea")
        _add(c, "use_fbcache", action="store_true", help="xDiT's spelling of --cache_method Fb")
        _add(c, "cache_ratio_threshold", type=float, default=0.05, help="main threshold of every method; larger skips more (0.05)")
        _add(c, "motion_threshold", type=float, default=0.1, help="FastCache static-token threshold; 0 disables (0.1)")
        _add(c, "significance_level", type=float, default=0.05, help="FastCache χ² test α; smaller skips more (0.05)")
        _add(c, "cache_warmup_steps", type=int, default=1, help="first steps that always compute (1)")
        _add(c, "max_cached_steps", type=int, default=-1, help="max consecutive cached steps, -1 = no cap (-1)")
        _add(c, "approximation", default="learned", choices=list(APPROXIMATIONS),
             help="FastCache's stand-in for a skipped block: learned (calibrated forecast, default; extrapolate "
                  "when the model has no calibration) | extrapolate (first-order forecast) | reuse | fitted | auto")
        _add(c, "fastcache_calibration", default=None,
             help="FastCache calibration file from `python -m xfuser.model_executor.cache.calibrate --method Fast` "
                  "(default: fastcache.safetensors beside the model)")
        _add(c, "tea_coefficients", default=None, help="JSON file from the calibrate command (TeaCache)")
        _add(c, "debug_cache_agreement", action="store_true", help="verify cache decisions match on all ranks")
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
                debug_cache_agreement=self.debug_cache_agreement,
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
        return engine, inputs
