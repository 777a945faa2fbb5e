"""Engine and input configuration, validated before anything loads.

Every check raises :class:`ConfigError` whose message names the CLI flag and the fix, so a
bad launch fails in milliseconds on every rank instead of deadlocking or OOMing later.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

CACHE_METHODS = ("None", "Fast", "Fb", "Tea")
APPROXIMATIONS = ("learned", "extrapolate", "reuse", "fitted", "auto")
DTYPES = ("auto", "float32", "bfloat16", "float16")
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
DEFAULT_PROMPT = "a red circle on a blue background, top left"  # a caption the embedded model knows
#: USP attention kernels (``auto``: flash-attn on CUDA when installed, else torch SDPA; the CPU
#: flash kernel on CPU); see xfuser/core/attention/kernels.py
ATTENTION_BACKENDS = ("auto", "flash_attn", "sdpa", "cpu")
#: diffusers' CPU offload modes (``--enable_model_cpu_offload`` / ``--enable_sequential_cpu_offload``)
CPU_OFFLOAD = ("none", "model", "sequential")


class ConfigError(ValueError):
    """A user-facing configuration error (names the flag and the fix)."""


def _finite_nonneg(value, flag: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{flag} must be a number, got {value!r}") from exc
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{flag} must be a finite number >= 0, got {value}")
    return value


def _positive_int(value, flag: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{flag} must be an integer >= {minimum}, got {value!r}")
    return value


def normalise_method(method) -> str:
    key = "None" if method is None else str(method)
    for known in CACHE_METHODS:
        if known.lower() == key.lower():
            return known
    raise ConfigError(f"--cache_method {method!r} is unknown; choose one of {', '.join(CACHE_METHODS)}")


@dataclass
class ModelConfig:
    """``model``: a diffusers directory or hub id. ``dtype``: weights/compute dtype; ``auto``
    (the default) is float32 on CPU and, on an accelerator, the checkpoint's own half
    precision (float16/bfloat16) or else bfloat16 (see :func:`xfuser.config.dtype.resolve_dtype`)."""

    model: str
    dtype: str = "auto"

    @property
    def torch_dtype(self):
        """The dtype to load with, ``auto`` resolved for the device this process computes on."""
        from xfuser.config.dtype import resolve_dtype  # lazy: validating a config should not import torch

        return resolve_dtype(self.dtype, self.model)

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("--model must name a diffusers model directory or hub id")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype {self.dtype!r} is unknown; choose one of {', '.join(DTYPES)}")


@dataclass
class ParallelConfig:
    """Degrees of every parallel dimension; their product must equal the number of processes.

    dp_degree: replicas working on different prompts (default 1). cfg_degree: 2 runs the
    conditional and unconditional branch on different ranks (default 1). ulysses_degree /
    ring_degree: sequence parallel split (default 1). pp_degree: PipeFusion stages (default 1).
    num_pipeline_patch: latent patches per step under PipeFusion (default: pp_degree).
    attn_layer_num_for_pp: blocks per stage (default: even split). use_parallel_vae: decode
    with distvae's patch-parallel VAE (default off).
    """

    dp_degree: int = 1
    cfg_degree: int = 1
    ulysses_degree: int = 1
    ring_degree: int = 1
    pp_degree: int = 1
    num_pipeline_patch: int | None = None
    attn_layer_num_for_pp: list[int] | None = None
    use_parallel_vae: bool = False

    def __post_init__(self) -> None:
        _positive_int(self.dp_degree, "--data_parallel_degree")
        if self.cfg_degree not in (1, 2):
            raise ConfigError(f"cfg degree must be 1 or 2 (--use_cfg_parallel gives 2), got {self.cfg_degree}")
        _positive_int(self.ulysses_degree, "--ulysses_degree")
        _positive_int(self.ring_degree, "--ring_degree")
        _positive_int(self.pp_degree, "--pipefusion_parallel_degree")
        if self.num_pipeline_patch is None:
            self.num_pipeline_patch = self.pp_degree
        _positive_int(self.num_pipeline_patch, "--num_pipeline_patch")
        if self.num_pipeline_patch < self.pp_degree:
            raise ConfigError(
                f"--num_pipeline_patch ({self.num_pipeline_patch}) must be >= --pipefusion_parallel_degree "
                f"({self.pp_degree}): every stage needs a patch in flight"
            )
        if self.attn_layer_num_for_pp is not None:
            if len(self.attn_layer_num_for_pp) != self.pp_degree:
                raise ConfigError(
                    f"--attn_layer_num_for_pp needs one block count per stage ({self.pp_degree} values), "
                    f"got {list(self.attn_layer_num_for_pp)}"
                )
            for n in self.attn_layer_num_for_pp:
                _positive_int(n, "--attn_layer_num_for_pp")

    @property
    def sp_degree(self) -> int:
        return self.ulysses_degree * self.ring_degree

    @property
    def world_size(self) -> int:
        return self.dp_degree * self.cfg_degree * self.sp_degree * self.pp_degree

    def validate_world_size(self, world_size: int) -> None:
        if self.world_size != world_size:
            raise ConfigError(
                f"--data_parallel_degree({self.dp_degree}) x cfg({self.cfg_degree}, 2 if --use_cfg_parallel) x "
                f"--ulysses_degree({self.ulysses_degree}) x --ring_degree({self.ring_degree}) x "
                f"--pipefusion_parallel_degree({self.pp_degree}) = {self.world_size}, but the world size is "
                f"{world_size}; make the product equal to the number of processes (torchrun --nproc_per_node)"
            )


@dataclass
class RuntimeConfig:
    """warmup_steps: synchronous full-image steps before PipeFusion's patch pipeline (1).
    use_torch_compile: compile the transformer (off). collective_timeout_s: seconds any
    collective may wait for its peers before raising (120: a stuck job ends in 2 minutes, yet a
    PipeFusion stage may wait that long for earlier stages compiling their first step; the
    start-up, where a peer may still be loading its model, waits up to 600).
    pipefusion_step_overlap: PipeFusion's stage 0 starts step t+1 on a patch as soon as the
    last stage has stepped it, so the pipeline fills once per generation instead of once per
    step (on; off = ``--pipefusion_sync_steps``, same numerics, one bubble per step).
    attention_backend: USP attention kernel, one of ``ATTENTION_BACKENDS`` (auto).
    vae_tiling / vae_slicing: diffusers' tiled / per-sample VAE decode (off).
    cpu_offload: ``none`` | ``model`` | ``sequential``, diffusers' CPU offload (none)."""

    warmup_steps: int = 1
    use_torch_compile: bool = False
    collective_timeout_s: float = 120.0
    pipefusion_step_overlap: bool = True
    attention_backend: str = "auto"
    vae_tiling: bool = False
    vae_slicing: bool = False
    cpu_offload: str = "none"

    def __post_init__(self) -> None:
        _positive_int(self.warmup_steps, "--warmup_steps", minimum=0)
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(
                f"--attention_backend {self.attention_backend!r} is unknown; choose one of {', '.join(ATTENTION_BACKENDS)}"
            )
        if self.cpu_offload not in CPU_OFFLOAD:
            raise ConfigError(f"cpu_offload {self.cpu_offload!r} is unknown; choose one of {', '.join(CPU_OFFLOAD)}")
        t = _finite_nonneg(self.collective_timeout_s, "--collective_timeout")
        if t == 0:
            raise ConfigError("--collective_timeout must be > 0 seconds")


@dataclass
class CacheConfig:
    """What to cache and how aggressively.

    method: None | Fast | Fb | Tea (None). cache_ratio_threshold: the main speed/quality knob of
    every method, larger = more skipping (0.05; its meaning per method is in the README).
    motion_threshold: FastCache token reduction, a token is static when its change is below
    this fraction of the mean token change; 0 disables (0.1). significance_level: α of
    FastCache's χ² test, smaller = skips more (0.05). cache_warmup_steps: first steps that always
    compute (1). max_cached_steps: most consecutive skipped steps per block/stack, -1 = no cap
    (-1). betas: FastCache adaptive threshold (β0, β1, β2, β3) (0.01, 0.5, -0.002, 0.00005).
    approximation: what FastCache puts in place of a skipped block's residual: learned (the
    default: the forecast fitted offline by the calibrate command, ``calibration`` or
    ``fastcache.safetensors`` beside the model; it also sets which blocks may skip; without a
    file, extrapolate) | extrapolate (first-order forecast from the block's last two computed
    residuals, R_ref + (t − t_ref)/(t_ref − t_prev)·(R_ref − R_prev)) | reuse (R_ref) | fitted
    (ridge map of the input change, fitted online) | auto (reuse or fitted, per block by
    held-out error); see docs/methods/fastcache.md. calibration: path of a FastCache
    calibration file (None: look beside the model). ridge: FastCache online ridge strength
    relative to the mean eigenvalue (0.1).
    tea_coefficients: TeaCache rescaling polynomial, highest power first (None: the model's
    published set, else identity with a warning). debug_cache_agreement: verify decisions
    across ranks after every step (off).
    """

    method: str | None = "None"
    cache_ratio_threshold: float = 0.05
    motion_threshold: float = 0.1
    significance_level: float = 0.05
    cache_warmup_steps: int = 1
    max_cached_steps: int = -1
    betas: tuple[float, float, float, float] = (0.01, 0.5, -0.002, 0.00005)
    approximation: str = "learned"
    calibration: str | None = None
    ridge: float = 0.1
    tea_coefficients: list[float] | None = None
    debug_cache_agreement: bool = False

    def __post_init__(self) -> None:
        self.method = normalise_method(self.method)
        self.cache_ratio_threshold = _finite_nonneg(self.cache_ratio_threshold, "--cache_ratio_threshold")
        self.motion_threshold = _finite_nonneg(self.motion_threshold, "--motion_threshold")
        alpha = _finite_nonneg(self.significance_level, "--significance_level")
        if not 0 < alpha < 1:
            raise ConfigError(f"--significance_level must be strictly between 0 and 1, got {alpha}")
        self.significance_level = alpha
        _positive_int(self.cache_warmup_steps, "--cache_warmup_steps", minimum=0)
        if isinstance(self.max_cached_steps, bool) or not isinstance(self.max_cached_steps, int) or self.max_cached_steps < -1:
            raise ConfigError(f"--max_cached_steps must be -1 (no cap) or an integer >= 0, got {self.max_cached_steps!r}")
        if len(tuple(self.betas)) != 4:
            raise ConfigError(f"betas must be 4 numbers (β0, β1, β2, β3), got {self.betas!r}")
        betas = tuple(float(b) for b in self.betas)
        if not all(math.isfinite(b) for b in betas) or betas[0] <= 0:
            raise ConfigError(f"betas must be finite with β0 > 0, got {betas}")
        self.betas = betas
        if self.approximation not in APPROXIMATIONS:
            raise ConfigError(f"approximation {self.approximation!r} is unknown; choose one of {APPROXIMATIONS}")
        self.ridge = _finite_nonneg(self.ridge, "ridge")
        if self.calibration is not None:
            from pathlib import Path

            if not Path(self.calibration).is_file():
                raise ConfigError(
                    f"--fastcache_calibration {self.calibration}: no such file; make one with `python -m "
                    "xfuser.model_executor.cache.calibrate --model MODEL_DIR --method Fast --out FILE`"
                )
            self.calibration = str(self.calibration)
        if self.tea_coefficients is not None:
            coeffs = [float(c) for c in self.tea_coefficients]
            if not coeffs or not all(math.isfinite(c) for c in coeffs):
                raise ConfigError(f"--tea_coefficients must be finite numbers, got {self.tea_coefficients!r}")
            self.tea_coefficients = coeffs

    @property
    def enabled(self) -> bool:
        return self.method != "None"


@dataclass
class InputConfig:
    """What to generate. height/width: pixels (None: the model's native size). num_frames:
    video models only. prompt: one or more prompts (a batch). guidance_scale: None keeps the
    pipeline's default, else >= 0 (a negative prompt needs > 1). seed: generator seed (42).
    output_type: pil | np | pt | latent (the example entry points save pil as PNG/GIF, np as
    .npy, pt/latent as .pt). max_sequence_length: text tokens, >= 1 and, where the checkpoint's
    files say, at most its tokenizer's ``model_max_length``."""

    prompt: list[str] = field(default_factory=lambda: [DEFAULT_PROMPT])
    negative_prompt: str | list[str] = ""
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    num_inference_steps: int = 20
    guidance_scale: float | None = None
    seed: int = 42
    output_type: str = "pil"
    max_sequence_length: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.prompt, str):
            self.prompt = [self.prompt]
        if not self.prompt:
            raise ConfigError("--prompt needs at least one prompt")
        for flag in ("height", "width", "num_frames", "max_sequence_length"):
            value = getattr(self, flag)
            if value is not None:
                _positive_int(value, f"--{flag}")
        _positive_int(self.num_inference_steps, "--num_inference_steps")
        if self.guidance_scale is not None:
            try:
                g = float(self.guidance_scale)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"--guidance_scale must be a number, got {self.guidance_scale!r}") from exc
            if not math.isfinite(g):
                raise ConfigError(f"--guidance_scale must be finite, got {self.guidance_scale}")
            if g < 0:
                raise ConfigError(f"--guidance_scale must be >= 0, got {g}; use 0-1 for no guidance, > 1 for CFG")
            self.guidance_scale = g
        if isinstance(self.negative_prompt, (list, tuple)):
            self.negative_prompt = list(self.negative_prompt)
            if len(self.negative_prompt) not in (1, len(self.prompt)):
                raise ConfigError(
                    f"--negative_prompt gives {len(self.negative_prompt)} prompts for {len(self.prompt)} --prompt "
                    "values; give one negative prompt or one per prompt"
                )
        elif not isinstance(self.negative_prompt, str):
            raise ConfigError(f"--negative_prompt must be a string or a list of strings, got {self.negative_prompt!r}")
        has_negative = any(self.negative_prompt) if isinstance(self.negative_prompt, list) else bool(self.negative_prompt)
        if has_negative and self.guidance_scale is not None and self.guidance_scale <= 1.0:
            # refused, not warned: the request asks for something that cannot take effect, and a
            # warning scrolls past once per rank under torchrun
            raise ConfigError(
                f"--negative_prompt is ignored when --guidance_scale is {self.guidance_scale} (<= 1 turns "
                "classifier-free guidance off); raise --guidance_scale above 1 or drop --negative_prompt"
            )
        if self.output_type not in OUTPUT_TYPES:
            raise ConfigError(f"--output_type must be one of {', '.join(OUTPUT_TYPES)}, got {self.output_type!r}")

    @property
    def batch_size(self) -> int:
        return len(self.prompt)


@dataclass
class EngineConfig:
    """Everything about *how* to run (model, runtime, parallelism, caching); each part is
    validated on construction, and :meth:`validate` adds the checks that need the inputs."""

    model_config: ModelConfig
    runtime_config: RuntimeConfig = field(default_factory=RuntimeConfig)
    parallel_config: ParallelConfig = field(default_factory=ParallelConfig)
    cache_config: CacheConfig = field(default_factory=CacheConfig)


def validate_engine_and_input(engine: EngineConfig, inputs: InputConfig) -> None:
    """Checks that need both halves of the configuration (``create_config`` adds those against
    the checkpoint's JSON files, :func:`xfuser.config.model_files.check_model_files`)."""
    p, c = engine.parallel_config, engine.cache_config
    if p.cfg_degree == 2 and inputs.guidance_scale is not None and inputs.guidance_scale <= 1.0:
        raise ConfigError(
            f"--use_cfg_parallel needs classifier-free guidance, but --guidance_scale is {inputs.guidance_scale} "
            "(<= 1 disables it); raise --guidance_scale or drop --use_cfg_parallel"
        )
    if p.pp_degree > 1:
        if engine.runtime_config.warmup_steps > inputs.num_inference_steps:
            raise ConfigError(
                f"--warmup_steps ({engine.runtime_config.warmup_steps}) exceeds --num_inference_steps "
                f"({inputs.num_inference_steps}) under PipeFusion"
            )
        if inputs.height is not None and inputs.height % p.num_pipeline_patch:
            raise ConfigError(
                f"--height ({inputs.height}) must be divisible by --num_pipeline_patch ({p.num_pipeline_patch})"
            )
    if c.enabled and c.cache_warmup_steps >= inputs.num_inference_steps:
        raise ConfigError(
            f"--cache_warmup_steps ({c.cache_warmup_steps}) must be < --num_inference_steps "
            f"({inputs.num_inference_steps}) or nothing can ever be cached"
        )
    if inputs.batch_size % p.dp_degree and p.dp_degree > 1:
        raise ConfigError(
            f"{inputs.batch_size} prompt(s) cannot be split evenly over --data_parallel_degree {p.dp_degree}; "
            "give a multiple of the degree"
        )
