"""One prepared device check of the engine's CUDA path, sized for a short loan of one GPU.

    bash tools/gpu_check.sh --out /tmp/gpu_check          # CUDA, full width, <= 8 min, writes docs/performance/gpu.md
    bash tools/gpu_check.sh --smoke --out /tmp/gpu_smoke  # tiny sizes on CPU (CI keeps it from rotting)

Full-width random-weight PixArt-Σ XL and FLUX.1 transformers are built from their published
configs straight on the device (no hub, no text encoder, no VAE) and fed directly in a
denoising-like loop: random latents, random text embeddings, decreasing timesteps. Measured:
uncached step latency (bf16 and fp32), every cache method at forced decisions (threshold 0 =
always compute, i.e. the bookkeeping overhead; threshold 1e9 = always skip, i.e. the speed-up
ceiling), torch.compile of the blocks (with and without a cache), and peak memory. Quality
is deliberately out of scope: random weights say nothing about it.

A time budget (``--budget-s``) is checked between sections; a section that would overrun is
skipped with its reason, and the JSON and the page are rewritten after every section, so a
killed run still leaves what it measured. A section that fails is recorded and the run goes on (exit
status 1 at the end).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import importlib.metadata
import importlib.util
import json
import math
import platform
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from gpu_check_page import DOCS_PAGE, render  # noqa: E402
from xfuser.config import CacheConfig  # noqa: E402
from xfuser.memory import peak_memory, reset_peak_memory  # noqa: E402
from xfuser.model_executor.cache.manager import CacheManager  # noqa: E402
from xfuser.timing import timed  # noqa: E402

SCHEMA = 1
METHODS = ("Fast", "Fb", "Tea")
#: forced decisions: a block/stack computes unless its change is below the threshold
THRESHOLDS = {"always_compute": 0.0, "always_skip": 1e9}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
#: rough cost of another dtype relative to bf16/fp32 main runs, only to decide whether it fits the budget
DTYPE_COST = {("cuda", "fp32"): 12.0, ("cuda", "bf16"): 0.5, ("cpu", "bf16"): 3.0, ("cpu", "fp32"): 1.0}
#: first-call compile per block class (dynamo traces each class twice: its first instance, then a
#: generalised graph the other instances share), cold inductor cache; only for budget decisions
COMPILE_ESTIMATE_S = {"cuda": 45.0, "cpu": 12.0}
#: headroom over the weights a build needs on an accelerator (activations, workspace, allocator)
MEMORY_HEADROOM = 1.3


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Parameters are created in ``dtype``: a bf16 build never holds an fp32 copy (a full-depth
    FLUX is 48 GB in fp32)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


# ---------------------------------------------------------------------------------- workloads
@dataclass(frozen=True)
class Inputs:
    """What one generation feeds the transformer besides latents and the timestep."""

    latents: torch.Tensor
    kwargs: dict[str, Any]


@dataclass(frozen=True)
class Workload:
    """One model at one size: constructor config, batch, token counts and its forward call."""

    name: str
    label: str
    config: dict[str, Any]
    batch: int
    text_tokens: int
    image_tokens: int
    notes: str

    block_classes: int  # distinct block classes: what torch.compile traces

    @property
    def cls(self) -> type[nn.Module]:
        from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel

        return PixArtTransformer2DModel if self.name == "pixart-sigma" else FluxTransformer2DModel

    def build(self, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
        """Random weights initialised on ``device`` itself (no host copy of a multi-GB model)."""
        torch.manual_seed(seed)
        with torch.device(device), default_dtype(dtype):
            model = self.cls(**self.config)
        return model.to(dtype).eval().requires_grad_(False)

    @functools.cached_property
    def parameter_count(self) -> int:
        """Counted on the meta device: what a build would allocate, before allocating it."""
        with torch.device("meta"):
            return sum(p.numel() for p in self.cls(**self.config).parameters())

    def memory_shortfall(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """Why a build in ``dtype`` would not fit the accelerator's free memory (None: it fits,
        or the device cannot say)."""
        mem_get_info = getattr(getattr(torch, device.type, None), "mem_get_info", None)
        if device.type == "cpu" or mem_get_info is None:
            return None
        need = MEMORY_HEADROOM * self.parameter_count * torch.empty((), dtype=dtype).element_size()
        free = mem_get_info(device)[0]
        if need <= free:
            return None
        return f"needs about {need / 2**30:.0f} GiB ({MEMORY_HEADROOM}x the weights), {free / 2**30:.0f} GiB free"

    def inputs(self, device: torch.device, dtype: torch.dtype, seed: int) -> Inputs:
        g = torch.Generator(device="cpu").manual_seed(seed)

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

        c = self.config
        if self.name == "pixart-sigma":
            side = c["sample_size"]
            return Inputs(randn(self.batch, c["in_channels"], side, side), {
                "encoder_hidden_states": randn(self.batch, self.text_tokens, c["caption_channels"]),
                "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
            })
        side = math.isqrt(self.image_tokens)
        rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
        return Inputs(randn(self.batch, self.image_tokens, c["in_channels"]), {
            "encoder_hidden_states": randn(self.batch, self.text_tokens, c["joint_attention_dim"]),
            "pooled_projections": randn(self.batch, c["pooled_projection_dim"]),
            "img_ids": img_ids.to(device=device, dtype=dtype),
            "txt_ids": torch.zeros(self.text_tokens, 3, device=device, dtype=dtype),
            "guidance": torch.full((self.batch,), 3.5, device=device, dtype=dtype),
        })

    def predict(self, transformer: nn.Module, inputs: Inputs, latents: torch.Tensor, t: float) -> torch.Tensor:
        """The model's prediction at normalised time ``t`` in (0, 1] (PixArt counts in 1000ths)."""
        scale = 1000.0 if self.name == "pixart-sigma" else 1.0
        timestep = torch.full((self.batch,), t * scale, device=latents.device, dtype=latents.dtype)
        out = transformer(hidden_states=latents, timestep=timestep, return_dict=False, **inputs.kwargs)[0]
        return out[:, : latents.shape[1]]  # PixArt-Σ also predicts its variance: keep the noise channels

    def architecture(self) -> dict[str, Any]:
        c = self.config
        heads, head_dim = c["num_attention_heads"], c["attention_head_dim"]
        depth = {"layers": c["num_layers"]} if self.name == "pixart-sigma" else {
            "double_blocks": c["num_layers"], "single_blocks": c["num_single_layers"]}
        return {
            "class": self.cls.__name__, "label": self.label, **depth, "heads": heads, "head_dim": head_dim,
            "width": heads * head_dim, "image_tokens": self.image_tokens, "text_tokens": self.text_tokens,
            "batch": self.batch, "parameters": self.parameter_count, "notes": self.notes, "config": c,
        }


def pixart(smoke: bool) -> Workload:
    """PixArt-Σ XL/2 at 1024 px: 128x128 latent, patch 2 -> 4096 tokens; 300 T5 tokens; batch 2 (CFG)."""
    if smoke:
        config = dict(num_layers=2, num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, patch_size=2,
                      sample_size=16, cross_attention_dim=32, caption_channels=32, norm_type="ada_norm_single",
                      use_additional_conditions=False)
        return Workload("pixart-sigma", "PixArt-Σ (tiny)", config, 2, 16, 64, "tiny smoke size", 1)
    config = dict(num_layers=28, num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, patch_size=2,
                  sample_size=128, cross_attention_dim=1152, caption_channels=4096, norm_type="ada_norm_single",
                  use_additional_conditions=False)
    return Workload("pixart-sigma", "PixArt-Σ XL/2 1024px", config, 2, 300, 4096, "full depth; batch 2 = CFG pair", 1)


def flux(smoke: bool, depth: tuple[int, int] | None) -> Workload:
    """FLUX.1 at 1024 px: 4096 packed image tokens + 512 T5 tokens, batch 1 (guidance-distilled);
    the published depth is 19 double + 38 single blocks, the default here is 4 + 8 (time)."""
    if smoke:
        double, single = depth or (1, 2)
        config = dict(num_layers=double, num_single_layers=single, num_attention_heads=2, attention_head_dim=16, in_channels=64,
                      joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
        return Workload("flux", "FLUX.1 (tiny)", config, 1, 16, 64, "tiny smoke size", 2)
    double, single = depth or (4, 8)
    config = dict(num_layers=double, num_single_layers=single, num_attention_heads=24, attention_head_dim=128, in_channels=64,
                  joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    full = (double, single) == (19, 38)
    return Workload("flux", "FLUX.1 1024px", config, 1, 512, 4096,
                    "full depth" if full else f"reduced depth {double}+{single} of 19+38 (time); full width", 2)


# ---------------------------------------------------------------------------------- timing
@dataclass(frozen=True)
class Plan:
    """How each configuration is run: steps per generation, untimed and timed generations."""

    steps: int
    warmup: int
    repeats: int
    device: torch.device
    seed: int = 0

    def timesteps(self) -> list[float]:
        return [1.0 - i / self.steps for i in range(self.steps)]


def generate(transformer: nn.Module, work: Workload, inputs: Inputs, plan: Plan) -> list[float]:
    """One denoising-like pass (Euler steps of a flow); the seconds of every transformer call."""
    latents = inputs.latents.clone()
    seconds = []
    for t in plan.timesteps():
        pred, s = timed(lambda: work.predict(transformer, inputs, latents, t), plan.device)
        latents = latents - pred / plan.steps
        seconds.append(s)
    return seconds


def summarise(generations: list[list[float]], steps: int) -> dict[str, Any]:
    """Per-step (median, min over every timed step) and per-generation figures, in ms."""
    per_step = [s for g in generations for s in g]
    totals = [sum(g) for g in generations]
    return {
        "step_ms": {"median": 1e3 * statistics.median(per_step), "min": 1e3 * min(per_step)},
        "generation_ms": {"median": 1e3 * statistics.median(totals), "min": 1e3 * min(totals)},
        "mean_step_ms": 1e3 * min(totals) / steps,  # the fastest generation, per step: what a cache changes
        "timed_generations": len(generations),
        "steps": steps,
    }


def measure(transformer: nn.Module, work: Workload, inputs: Inputs, plan: Plan,
            before: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Warm-up generations untimed, then timed ones with the peak memory over them."""
    with torch.no_grad():
        for _ in range(plan.warmup):
            before()
            generate(transformer, work, inputs, plan)
        reset_peak_memory(plan.device)
        generations = []
        for _ in range(plan.repeats):
            before()
            generations.append(generate(transformer, work, inputs, plan))
        peak = peak_memory(plan.device)
    return {**summarise(generations, plan.steps), "peak_memory": peak.as_dict()}


# ---------------------------------------------------------------------------------- caching
def forced_config(method: str, mode: str) -> CacheConfig:
    """A schedule fixed by the threshold alone: no warm-up beyond the method's own first
    computed step, no cap on skips, no token reduction (it would make 'always compute'
    compute a subset), and FastCache's first-order forecast (random weights have no
    calibration file)."""
    return CacheConfig(method=method, cache_ratio_threshold=THRESHOLDS[mode], max_cached_steps=-1, cache_warmup_steps=0,
                       motion_threshold=0.0, approximation="extrapolate")


def expected_hit_ratio(method: str, mode: str, steps: int, blocks: int) -> float:
    """The forced schedule's hit ratio: 0 when always computing; when always skipping, every
    step but the first (no reference yet) and the last (always computed) skips, and Fb still
    computes its first block."""
    if mode == "always_compute":
        return 0.0
    ratio = max(steps - 2, 0) / steps
    return ratio * (blocks - 1) / blocks if method == "Fb" else ratio


def schedule_evidence(stats: dict[str, Any], method: str, mode: str, steps: int) -> dict[str, Any]:
    """What ``manager.statistics()`` says happened, and whether it is the forced schedule."""
    expected = expected_hit_ratio(method, mode, steps, stats["num_blocks"])
    hit = stats["hit_ratio"]
    verified = hit == 0.0 if mode == "always_compute" else hit >= expected - 1e-9
    return {
        "hit_ratio": hit, "expected_hit_ratio": expected, "schedule_verified": bool(verified),
        "compute_fraction": stats["compute_fraction"],
        "cache_state_bytes": stats["cache_state_bytes"]["total"],
        "cache_state_mib": stats["cache_state_bytes"]["total"] / 2**20,
        "schedule": [s["actions"] for s in stats["per_step"]],
    }


def measure_cached(transformer: nn.Module, work: Workload, inputs: Inputs, plan: Plan, method: str, mode: str,
                   first_generation: bool = False) -> dict[str, Any]:
    """One method at one forced schedule, installed the way the engine does it. With
    ``first_generation`` the first (warm-up) generation is timed on its own as well (compile)."""
    manager = CacheManager(transformer, forced_config(method, mode)).install()
    try:
        first = None
        if first_generation:
            manager.reset(plan.steps)
            with torch.no_grad():
                first = sum(generate(transformer, work, inputs, plan))
        result = measure(transformer, work, inputs, plan, before=lambda: manager.reset(plan.steps))
        result.update(schedule_evidence(manager.statistics(), method, mode, plan.steps))
    finally:
        manager.uninstall()
    if first is not None:
        result["first_generation_s"] = first
    return result


# ---------------------------------------------------------------------------------- compile
def load_compile_blocks() -> Callable[[nn.Module], int] | None:
    """The engine's regional compilation, if this checkout has it (it arrived separately)."""
    try:
        from xfuser.model_executor.compile import compile_blocks
    except ImportError:
        return None
    return compile_blocks


def unique_graphs() -> int | None:
    """Graphs dynamo compiled so far in this process (an internal counter; None if absent)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # noqa: BLE001 - diagnostics only
        return None


def measure_compiled(work: Workload, plan: Plan, dtype: torch.dtype, method: str) -> dict[str, Any]:
    """Compiled uncached latency (first call = compile + one step, reported apart), then the
    same compiled transformer with ``method`` at always-skip."""
    compile_blocks = load_compile_blocks()
    if compile_blocks is None:
        return {"skipped": "compile_blocks not available"}
    if (shortfall := work.memory_shortfall(plan.device, dtype)) is not None:
        return {"skipped": f"memory: {shortfall}"}
    torch._dynamo.reset()
    transformer = work.build(plan.device, dtype, plan.seed)
    inputs = work.inputs(plan.device, dtype, plan.seed)
    graphs_before = unique_graphs()
    try:
        blocks = compile_blocks(transformer)
        with torch.no_grad():
            first = generate(transformer, work, inputs, plan)
        uncached = measure(transformer, work, inputs, plan)
        first_call_s = first[0]
        graphs_uncached = unique_graphs()
        cached = measure_cached(transformer, work, inputs, plan, method, "always_skip", first_generation=True)
        graphs_cached = unique_graphs()
    finally:
        del transformer, inputs
        free_memory(plan.device)
    result = {
        "compiled_blocks": blocks, "dtype": dtype_name(dtype),
        "first_call_s": first_call_s,
        "compile_s": max(first_call_s - uncached["step_ms"]["median"] / 1e3, 0.0),
        "first_generation_s": sum(first),
        "uncached": uncached,
        "cached": {"method": method, "mode": "always_skip", **cached},
    }
    if graphs_before is not None and graphs_uncached is not None and graphs_cached is not None:
        result["graphs"] = {"uncached": graphs_uncached - graphs_before, "added_by_cache": graphs_cached - graphs_uncached}
    return result


# ---------------------------------------------------------------------------------- bookkeeping
def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, d in DTYPES.items() if d == dtype)


def free_memory(device: torch.device) -> None:
    """Hand the allocator's cached blocks back once the caller dropped its model, so the next
    build (and its peak-memory figure) starts from an empty device."""
    gc.collect()
    backend = getattr(torch, device.type, None)
    if device.type != "cpu" and hasattr(backend, "empty_cache"):
        backend.empty_cache()


def git_commit() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "--short", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    env: dict[str, Any] = {
        "device": str(device), "dtype": dtype_name(dtype),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": package_version("diffusers"),
        "python": platform.python_version(), "platform": platform.platform(),
        "flash_attn": (package_version("flash-attn") or "installed") if importlib.util.find_spec("flash_attn") else None,
        "cpu_threads": torch.get_num_threads(), **git_commit(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=torch.cuda.get_device_name(device), device_memory_gib=props.total_memory / 2**30,
                   compute_capability=f"{props.major}.{props.minor}", tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                   flash_sdp=torch.backends.cuda.flash_sdp_enabled())
    else:
        env["device_name"] = platform.processor() or platform.machine() or device.type
    return env


@dataclass
class Run:
    """The result document, its budget and its sections; the JSON and the page(s) are rewritten
    after every section, so a run killed at its time limit still leaves both."""

    out: Path
    budget_s: float
    doc: dict[str, Any]
    pages: list[Path]
    start: float = field(default_factory=time.perf_counter)

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    def section(self, name: str, fn: Callable[[], Any], store: Callable[[Any], None], estimate_s: float = 0.0) -> bool:
        """Run ``fn`` unless the budget says no, ``store`` its result (or the skip/failure),
        log it and rewrite the outputs. True when it ran to the end."""
        entry: dict[str, Any] = {"name": name, "estimate_s": round(estimate_s, 1)}
        left = self.left()
        began = time.perf_counter()
        if left <= 0 or estimate_s > left:
            reason = f"time budget: estimated {estimate_s:.0f} s, {max(left, 0):.0f} s of {self.budget_s:.0f} s left"
            entry.update(status="skipped", reason=reason)
            store({"skipped": entry["reason"]})
        else:
            try:
                value = fn()
                if isinstance(value, dict) and "skipped" in value:
                    entry.update(status="skipped", reason=value["skipped"])
                else:
                    entry["status"] = "done"
                store(value)
            except Exception as exc:  # noqa: BLE001 - one failed section must not lose the others
                entry.update(status="failed", error=f"{type(exc).__name__}: {exc}")
                store({"failed": entry["error"]})
                traceback.print_exc()
        entry["seconds"] = round(time.perf_counter() - began, 2)
        self.doc["sections"].append(entry)
        self.doc["elapsed_s"] = round(time.perf_counter() - self.start, 2)
        self.write()
        note = entry.get("reason") or entry.get("error")
        print(f"[gpu_check] {name}: {entry['status']} in {entry['seconds']:.1f} s{f' ({note})' if note else ''}; "
              f"{max(self.left(), 0):.0f} s of the budget left", flush=True)
        return entry["status"] == "done"

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write(self.out / "gpu_check.json", json.dumps(self.doc, indent=1, default=str) + "\n")
        page = render(self.doc)
        for path in self.pages:
            atomic_write(path, page)


def atomic_write(path: Path, text: str) -> None:
    """Write beside, then rename: a kill mid-write never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


# ---------------------------------------------------------------------------------- the run
def other_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype == torch.bfloat16 else torch.bfloat16


def generation_seconds(model_doc: dict[str, Any], dtype: str) -> float:
    """The measured uncached generation time, for budget estimates (0 when unmeasured)."""
    entry = model_doc["uncached"].get(dtype, {})
    return entry.get("generation_ms", {}).get("median", 0.0) / 1e3


def main_dtype_sections(run: Run, work: Workload, plan: Plan, dtype: torch.dtype) -> None:
    """Uncached and every method at both forced schedules, on one build of the model."""
    model_doc = run.doc["models"][work.name]
    name = dtype_name(dtype)
    state: dict[str, Any] = {}

    def build_and_measure() -> dict[str, Any]:
        if (shortfall := work.memory_shortfall(plan.device, dtype)) is not None:
            return {"skipped": f"memory: {shortfall}"}
        began = time.perf_counter()
        state["transformer"] = work.build(plan.device, dtype, plan.seed)
        state["inputs"] = work.inputs(plan.device, dtype, plan.seed)
        build_s = time.perf_counter() - began
        return {**measure(state["transformer"], work, state["inputs"], plan), "build_s": build_s}

    def run_method(method: str) -> dict[str, Any]:
        return {mode: measure_cached(state["transformer"], work, state["inputs"], plan, method, mode) for mode in THRESHOLDS}

    try:
        ran = run.section(f"{work.name}/uncached-{name}", build_and_measure, lambda v: model_doc["uncached"].__setitem__(name, v))
        per_method = 2 * (plan.warmup + plan.repeats) * generation_seconds(model_doc, name)
        for method in METHODS:
            if ran:
                run.section(f"{work.name}/{method}", functools.partial(run_method, method),
                            functools.partial(model_doc["methods"].__setitem__, method), estimate_s=per_method)
            else:
                run.section(f"{work.name}/{method}", lambda: {"skipped": f"no uncached {name} model"},
                            functools.partial(model_doc["methods"].__setitem__, method))
    finally:
        state.clear()
        free_memory(plan.device)


def other_dtype_section(run: Run, work: Workload, plan: Plan, dtype: torch.dtype, main: torch.dtype) -> None:
    """Uncached latency in the other dtype, on a build of its own (estimated from the main one)."""
    model_doc = run.doc["models"][work.name]
    name = dtype_name(dtype)
    cost = DTYPE_COST.get((plan.device.type, name), 1.0)
    estimate = cost * (plan.warmup + plan.repeats) * generation_seconds(model_doc, dtype_name(main))

    def build_and_measure() -> dict[str, Any]:
        if (shortfall := work.memory_shortfall(plan.device, dtype)) is not None:
            return {"skipped": f"memory: {shortfall}"}
        transformer = work.build(plan.device, dtype, plan.seed)
        inputs = work.inputs(plan.device, dtype, plan.seed)
        try:
            return measure(transformer, work, inputs, plan)
        finally:
            del transformer, inputs
            free_memory(plan.device)

    run.section(f"{work.name}/uncached-{name}", build_and_measure, lambda v: model_doc["uncached"].__setitem__(name, v), estimate)


def compile_section(run: Run, work: Workload, plan: Plan, dtype: torch.dtype, method: str, enabled: bool) -> None:
    model_doc = run.doc["models"][work.name]
    gen = generation_seconds(model_doc, dtype_name(dtype))
    estimate = COMPILE_ESTIMATE_S.get(plan.device.type, 45.0) * work.block_classes + 2 * (1 + plan.warmup + plan.repeats) * gen

    def compiled() -> dict[str, Any]:
        return measure_compiled(work, plan, dtype, method) if enabled else {"skipped": "--no-compile"}

    run.section(f"{work.name}/compile", compiled, lambda v: model_doc.__setitem__("compile", v), estimate if enabled else 0.0)


def planned_sections(works: list[Workload], main: torch.dtype) -> list[str]:
    """Every section in run order (the page names those a stopped run never reached)."""
    names = ["environment"]
    for work in works:
        names += [f"{work.name}/uncached-{dtype_name(main)}", *(f"{work.name}/{m}" for m in METHODS)]
    names += [f"{work.name}/uncached-{dtype_name(other_dtype(main))}" for work in works]
    return names + [f"{work.name}/compile" for work in works]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny widths/depths/tokens on CPU (CI)")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda if available; cpu with --smoke)")
    p.add_argument("--out", type=Path, default=Path("/tmp/gpu_check"), help="folder for gpu_check.json and gpu.md")
    p.add_argument("--write-docs", action=argparse.BooleanOptionalAction, default=None,
                   help=f"also write {DOCS_PAGE.relative_to(ROOT)} (default: on for a full CUDA run; refused with --smoke)")
    p.add_argument("--flux-depth", type=int, nargs=2, metavar=("DOUBLE", "SINGLE"), default=None,
                   help="FLUX double + single blocks (default 4 8; published 19 38; smoke 1 2)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps per generation (10; smoke 4)")
    p.add_argument("--repeats", type=int, default=None, help="timed generations per configuration (2; smoke 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed generations before each configuration's timed ones")
    p.add_argument("--budget-s", type=float, default=None, help="time budget in seconds (420; smoke 300)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="dtype of the main sections (bf16 on cuda, fp32 on cpu)")
    p.add_argument("--models", nargs="+", choices=("pixart-sigma", "flux"), default=["pixart-sigma", "flux"])
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="torch.compile sections")
    p.add_argument("--compile-method", choices=METHODS, default="Fast", help="cache method run compiled at always-skip")
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    args.device = torch.device(args.device)
    args.dtype = DTYPES[args.dtype or ("bf16" if args.device.type == "cuda" else "fp32")]
    args.steps = args.steps or (4 if args.smoke else 10)
    args.repeats = args.repeats or (1 if args.smoke else 2)
    args.budget_s = args.budget_s or (300.0 if args.smoke else 420.0)
    if args.steps < 3:
        p.error("--steps must be at least 3 (always-skip needs a step between the first and the last)")
    if args.write_docs and args.smoke:
        p.error("--write-docs with --smoke: the docs page holds full-size figures only")
    if args.write_docs is None:
        args.write_docs = not args.smoke and args.device.type == "cuda"
    return args


def quiet_libraries() -> None:
    """diffusers warns on every ``.to(dtype)`` of a model not loaded from a checkpoint."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    quiet_libraries()
    plan = Plan(args.steps, args.warmup, args.repeats, args.device)
    works = [pixart(args.smoke) if m == "pixart-sigma" else flux(args.smoke, args.flux_depth) for m in args.models]
    doc: dict[str, Any] = {
        "schema": SCHEMA, "mode": "smoke" if args.smoke else "full",
        "command": shlex.join(["bash", "tools/gpu_check.sh", *argv]),
        "settings": {"steps": plan.steps, "warmup": plan.warmup, "repeats": plan.repeats, "budget_s": args.budget_s,
                     "dtype": dtype_name(args.dtype), "thresholds": THRESHOLDS, "compile_method": args.compile_method,
                     "cache_config": {"max_cached_steps": -1, "cache_warmup_steps": 0, "motion_threshold": 0.0,
                                      "approximation": "extrapolate"}},
        "planned": planned_sections(works, args.dtype),
        "environment": {}, "models": {}, "sections": [],
    }
    run = Run(args.out, args.budget_s, doc, [args.out / "gpu.md", *([DOCS_PAGE] if args.write_docs else [])])
    for work in works:
        doc["models"][work.name] = {"architecture": work.architecture(), "uncached": {}, "methods": {}}
    run.section("environment", lambda: environment(args.device, args.dtype), lambda v: doc.__setitem__("environment", v))
    # most important first: the main dtype's latency and cache figures, then the other dtype, then compile
    for work in works:
        main_dtype_sections(run, work, plan, args.dtype)
    for work in works:
        other_dtype_section(run, work, plan, other_dtype(args.dtype), args.dtype)
    for work in works:
        compile_section(run, work, plan, args.dtype, args.compile_method, args.compile)
    doc["finished"] = True
    run.write()
    written = ", ".join(str(p) for p in [args.out / "gpu_check.json", *run.pages])
    print(f"[gpu_check] wrote {written} in {doc['elapsed_s']:.0f} s", flush=True)
    return 1 if any(s["status"] == "failed" for s in doc["sections"]) else 0


if __name__ == "__main__":
    sys.exit(main())
