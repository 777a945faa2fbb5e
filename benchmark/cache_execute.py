"""Speed and quality of each cache method (and of other projects' caches) against the
uncached run, on the same pipeline, prompts and seeds.

    python benchmark/cache_execute.py                                   # embedded model, all methods + peers
    python benchmark/cache_execute.py --cache_methods Fast Fb --sweep --num_inference_steps 20
    python benchmark/cache_execute.py --model_type pixart-sigma --model /path/to/PixArt-Sigma-XL-2-1024-MS

For every (prompt, seed) the uncached output is the reference. Latency: per case the fastest
of ``--repeats`` timed runs (interference on a shared machine only adds time), then the
median over cases, after one untimed warm-up run, all in this process; each
configuration's speed-up is against uncached runs interleaved with its own (every timed
cached run follows an uncached run of the same case), so a drift in the machine's load
cannot enter the ratio. Quality: PSNR and SSIM of the decoded
image vs the reference image, relative L2 of the final latents, LPIPS when its weights are
available locally (otherwise a "skipped" line). Peers (``--peers``, on by default):
diffusers' built-in cache hooks and cache-dit's DBCache when installed (benchmark/peers.py).
Everything is written to ``--output_dir``: results.json, every image, and with ``--report``
the grid, charts and report.html (benchmark/report.py). Each configuration also keeps its
per-repeat timings (``latency_runs_s`` / ``baseline_runs_s``) and the spread of its paired
ratios (``paired_speedup``), so the report can tell a speed-up from the machine's noise.
Progress is logged as "configuration i of n" with an ETA, and results.json is rewritten
(atomically) after every finished configuration: an interrupted run keeps what finished
(``progress.complete`` is false there).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from xfuser import strict_json  # noqa: E402
from xfuser import xFuserFastCachePipelineWrapper  # noqa: E402
from xfuser.config import CacheConfig  # noqa: E402
from xfuser.logger import init_logger  # noqa: E402
from xfuser.memory import peak_memory, reset_peak_memory  # noqa: E402
from xfuser.timing import model_device, timed  # noqa: E402
from xfuser.metrics import LPIPSUnavailable, lpips_scorer, psnr, relative_l2, ssim  # noqa: E402
from xfuser.model_executor.pipelines.call_args import prepare_call_kwargs  # noqa: E402
from xfuser.model_executor.pipelines.decode import decode_images  # noqa: E402
import xfuser.testing.tiny_pipelines  # noqa: E402,F401 - registers the tiny-* and random model types
from xfuser.model_executor.pipelines.model_types import all_model_types, call_defaults, default_size, load_pipeline, resolve_model  # noqa: E402

logger = init_logger("benchmark.cache_execute")

DEFAULT_THRESHOLDS = {"Fast": [0.05, 0.1, 0.15], "Fb": [0.05, 0.1, 0.2], "Tea": [0.1, 0.3, 0.6]}
SWEEP_THRESHOLDS = {
    # FastCache with a learned forecast compares its expected error with the threshold (a
    # relative output error per block); without a calibration file the same values still span
    # its range (docs/methods/fastcache.md)
    "Fast": [0.05, 0.1, 0.15, 0.3],
    "Fb": [0.1, 0.2, 0.5],
    "Tea": [0.2, 0.5, 1.0],
}
# max_cached_steps swept for every method alike: -1 (no cap), at most 2, 3 or 5 skipped steps in a row
SWEEP_CAPS = [-1, 2, 3, 5]
PEER_THRESHOLDS = [0.05, 0.1, 0.2]
DEFAULT_PROMPTS = [
    "a red circle on a blue background, top left",
    "a yellow triangle on a black background, center",
    "a white square on a green background, bottom right",
]
#: ``--heldout``: captions of the embedded model's held-out split (never trained on, and disjoint
#: from every calibration prompt: TeaCache's and FastCache's), for quality claims
HELDOUT_PROMPTS = [
    "a black circle on a green background, top left",
    "a green triangle on a blue background, bottom left",
    "a green triangle on a yellow background, center",
    "a yellow circle on a black background, top right",
]


class Bench:
    """The pipeline, its cache wrapper and the fixed inputs every configuration runs on."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.pipe = load_pipeline(args.model_type, args.model, layers=args.layers, hidden=args.hidden) \
            if args.model_type == "pixart-sigma-random" else load_pipeline(args.model_type, args.model)
        self.pipe.set_progress_bar_config(disable=True)
        self.wrapper = xFuserFastCachePipelineWrapper(self.pipe)
        size = default_size(args.model_type, args.model)
        defaults = call_defaults(args.model_type)
        self.kwargs = prepare_call_kwargs(
            self.pipe, args.height or size or defaults.pop("height", None), args.width or size or defaults.pop("width", None)
        )
        for key, value in defaults.items():
            self.kwargs.setdefault(key, value)
        if args.guidance_scale is not None:
            self.kwargs["guidance_scale"] = args.guidance_scale
        if args.max_sequence_length is not None:
            self.kwargs["max_sequence_length"] = args.max_sequence_length
        self.cases = [(p, s) for p in args.prompts for s in args.seeds]
        self.out_dir = Path(args.output_dir)

    def run_once(self, prompt: str, seed: int, before: Callable[[], None] | None = None):
        if before is not None:
            before()
        generator = torch.Generator().manual_seed(seed)
        device = model_device(self.pipe)
        reset_peak_memory(device)
        out, seconds = timed(lambda: self.wrapper(
            prompt=prompt, num_inference_steps=self.args.num_inference_steps, generator=generator,
            output_type="latent", **self.kwargs,
        ), device)
        self.last_peak = peak_memory(device)  # of the denoising loop (the decode below is not a cache's cost)
        latents = out.images
        return self.decode(latents), latents, seconds

    def decode(self, latents: torch.Tensor):
        return decode_images(self.pipe, latents, self.kwargs.get("height"), self.kwargs.get("width"))[0]

    def measure(
        self, name: str, before: Callable[[], None] | None = None, references=None,
        toggle: tuple[Callable[[], None], Callable[[], None]] | None = None,
    ) -> dict[str, Any]:
        """Median over cases of each case's fastest repeat; quality vs ``references``; images saved
        as ``name``. With ``toggle`` = (enable, disable) of the cache under test, every timed cached
        run is paired with an uncached run right before it (``baseline_latency_s``): the two see the
        same machine load, so a drift between configurations cannot enter their ratio. Every
        repeat's seconds are kept (``latency_runs_s``, ``baseline_runs_s``: per case, per repeat)
        so the spread of the paired ratios can be reported beside the speed-up."""
        if toggle is not None:
            toggle[1]()
            self.run_once(*self.cases[0])  # uncached warm-up, untimed
            toggle[0]()
        self.run_once(*self.cases[0], before)  # warm-up, untimed
        runs, base_runs, outputs, peaks = [], [], [], []
        for prompt, seed in self.cases:
            per_case, per_base = [], []
            for _ in range(self.args.repeats):
                if toggle is not None:
                    toggle[1]()
                    per_base.append(self.run_once(prompt, seed)[2])
                    toggle[0]()
                image, latents, seconds = self.run_once(prompt, seed, before)
                per_case.append(seconds)
                peaks.append(self.last_peak)
            runs.append(per_case)
            if per_base:
                base_runs.append(per_base)
            outputs.append((image, latents, self.wrapper.get_cache_statistics()))
        # interference only ever adds time: per case the fastest repeat is the cleanest
        times = [min(r) for r in runs]
        result: dict[str, Any] = {"latency_s": statistics.median(times), "latency_per_case_s": times,
                                  "latency_runs_s": runs, "images": []}
        result["peak_memory_bytes"] = max(p.bytes for p in peaks)
        result["peak_memory_kind"] = peaks[0].kind
        if base_runs:
            result["baseline_latency_s"] = statistics.median(min(r) for r in base_runs)
            result["baseline_runs_s"] = base_runs
            result["paired_speedup"] = paired_spread(base_runs, runs, self.args.repeats)
        for i, (image, _, _) in enumerate(outputs):
            path = f"{name}_case{i}.png"
            image.save(self.out_dir / path)
            result["images"].append(path)
        if references is not None:
            result["psnr"] = [psnr(o[0], r[0]) for o, r in zip(outputs, references)]
            result["ssim"] = [ssim(o[0], r[0]) for o, r in zip(outputs, references)]
            result["rel_l2_latents"] = [relative_l2(o[1], r[1]) for o, r in zip(outputs, references)]
            result["psnr_mean"] = statistics.mean(min(p, 100.0) for p in result["psnr"])
            result["psnr_worst"] = min(result["psnr"])  # quality floors are applied to the worst image
            result["ssim_mean"] = statistics.mean(result["ssim"])
            result["ssim_worst"] = min(result["ssim"])
            result["lpips"] = [self.lpips(o[0], r[0]) for o, r in zip(outputs, references)] if self.lpips else None
            result["lpips_mean"] = statistics.mean(result["lpips"]) if result["lpips"] else None
        stats = [o[2] for o in outputs if o[2]]
        for key in ("hit_ratio", "partial_ratio", "skipped_fraction"):  # fully skipped / partially computed blocks
            result[key] = statistics.mean(s[key] for s in stats) if stats else None
        result["compute_fraction"] = statistics.mean(s["compute_fraction"] for s in stats) if stats else None
        result["stats"] = stats[0] if stats else None
        result["cache_state_bytes"] = stats[0]["cache_state_bytes"]["total"] if stats else None  # peers: not ours to count
        return result, outputs


def paired_spread(base_runs: list[list[float]], runs: list[list[float]], repeats: int) -> dict[str, Any]:
    """min/median/max of uncached/cached over every (case, repeat) pair: each pair ran back to
    back, so its ratio carries the noise a single speed-up figure hides."""
    ratios = [b / c for base, cached in zip(base_runs, runs) for b, c in zip(base, cached)]
    return {"min": min(ratios), "median": statistics.median(ratios), "max": max(ratios), "repeats": repeats}


def write_results(report: dict[str, Any], path: Path) -> None:
    """results.json via a temporary file and ``os.replace``: a reader (or a run killed mid-write)
    never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(strict_json.dumps(report, indent=2, default=str))
    os.replace(tmp, path)


@dataclass
class Job:
    """One configuration: its label, its cost in generations (for the ETA) and its body."""

    label: str
    generations: int
    run: Callable[[], None]


def run_jobs(jobs: list[Job], report: dict[str, Any], path: Path) -> None:
    """Run ``jobs`` in order, logging "configuration i of n" with an ETA (seconds per finished
    generation so far x generations left) and rewriting results.json after each one."""
    total = sum(j.generations for j in jobs)
    done, start = 0, time.perf_counter()
    report["progress"] = {"finished": 0, "total": len(jobs), "complete": False}
    for i, job in enumerate(jobs, 1):
        elapsed = time.perf_counter() - start
        eta = f"ETA {elapsed / done * (total - done):.0f} s" if done else "ETA after the first configuration"
        logger.info("configuration %d of %d: %s (%.0f s elapsed, %s)", i, len(jobs), job.label, elapsed, eta)
        job.run()
        done += job.generations
        report["progress"].update(finished=i, complete=i == len(jobs))
        write_results(report, path)
    logger.info("%d configurations in %.0f s; wrote %s", len(jobs), time.perf_counter() - start, path)


def _label(method: str, threshold: float, cap: int = -1) -> str:
    return f"{method} {threshold:g}" + (f" cap {cap}" if cap >= 0 else "")


def _display_path(model: str | None) -> str | None:
    """Checkpoint paths inside the repository are written relative to it (reports are committed)."""
    root = Path(__file__).resolve().parents[1]
    if model and Path(model).is_absolute() and Path(model).resolve().is_relative_to(root):
        return str(Path(model).resolve().relative_to(root))
    return model


def sweep_points(method: str, args: argparse.Namespace) -> list[tuple[float, int]]:
    """(threshold, max_cached_steps) pairs one method runs at."""
    if args.thresholds:
        return [(t, args.max_cached_steps) for t in args.thresholds]
    if args.sweep:
        return [(t, cap) for cap in SWEEP_CAPS for t in SWEEP_THRESHOLDS[method]]
    return [(t, args.max_cached_steps) for t in DEFAULT_THRESHOLDS[method]]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_type", default="pixart", choices=all_model_types(),
                        help="pixart = PixArt-Σ pipeline (default model: the embedded one)")
    parser.add_argument("--model", default=None, help="diffusers model dir or hub id (default: the type's default)")
    parser.add_argument("--cache_methods", nargs="+", default=["None", "Fast", "Fb", "Tea"], choices=["None", "Fast", "Fb", "Tea"])
    parser.add_argument("--thresholds", nargs="+", type=float, default=None, help="one list for every method")
    parser.add_argument("--sweep", action="store_true",
                        help="SWEEP_THRESHOLDS x SWEEP_CAPS per method (speed-quality curves; about 2x the default run)")
    parser.add_argument("--num_inference_steps", type=int, default=20)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--guidance_scale", type=float, default=None)
    parser.add_argument("--max_sequence_length", type=int, default=None)
    parser.add_argument("--prompts", nargs="+", default=None, help="evaluation prompts (default: DEFAULT_PROMPTS)")
    parser.add_argument("--heldout", action="store_true", help="evaluate on HELDOUT_PROMPTS (the embedded model's held-out split)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--motion_threshold", type=float, default=0.1)
    parser.add_argument("--max_cached_steps", type=int, default=-1,
                        help="CacheConfig.max_cached_steps for our methods (--sweep sweeps SWEEP_CAPS)")
    parser.add_argument("--approximation", default="learned", choices=["learned", "extrapolate", "reuse", "fitted", "auto"],
                        help="FastCache's stand-in for a skipped block (CacheConfig.approximation)")
    parser.add_argument("--peers", action=argparse.BooleanOptionalAction, default=True,
                        help="also run diffusers' cache hooks and cache-dit (when installed)")
    parser.add_argument("--peer_thresholds", nargs="+", type=float, default=PEER_THRESHOLDS)
    parser.add_argument("--report", action="store_true", help="write grid, charts and report.html (benchmark/report.py)")
    parser.add_argument("--layers", type=int, default=12, help="pixart-sigma-random only")
    parser.add_argument("--hidden", type=int, default=384, help="pixart-sigma-random only")
    parser.add_argument("--output_dir", default="benchmark_results")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.heldout and args.prompts:
        parser.error("--heldout and --prompts both choose the prompts; give one")
    args.prompts = HELDOUT_PROMPTS if args.heldout else (args.prompts or DEFAULT_PROMPTS)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_grad_enabled(False)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bench = Bench(args)
    try:
        bench.lpips = lpips_scorer()
        lpips_info = {"available": True}
    except LPIPSUnavailable as exc:
        bench.lpips = None
        lpips_info = {"available": False, "reason": str(exc)}
        logger.info("LPIPS %s", exc)

    report: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, threads={torch.get_num_threads()}",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "model": _display_path(resolve_model(args.model_type, args.model)) or args.model_type,
        "model_type": args.model_type,
        "num_inference_steps": args.num_inference_steps,
        "height": bench.kwargs.get("height"),
        "width": bench.kwargs.get("width"),
        "cases": bench.cases,
        "repeats": args.repeats,
        "overhead": {},
        "overhead_spread": {},
        "overhead_runs": {},
        "runs": [],
        "skipped": [],
        "lpips": lpips_info,
    }
    references: list = []
    # generations per configuration: warm-up(s) + timed runs (a paired one doubles them)
    timed_runs = len(bench.cases) * args.repeats
    plain, paired = 1 + timed_runs, 2 + 2 * timed_runs

    def uncached() -> None:
        baseline, outputs = bench.measure("None")
        references.extend(outputs)
        report["baseline"] = {k: baseline[k] for k in
                              ("latency_s", "latency_per_case_s", "latency_runs_s", "images", "peak_memory_bytes", "peak_memory_kind")}
        logger.info("uncached: %.3fs", baseline["latency_s"])

    def record(result: dict[str, Any], method: str, threshold: float, kind: str, cap: int = -1) -> None:
        label = _label(method, threshold, cap)
        baseline_s = result["baseline_latency_s"]
        result.update(method=method, label=label, kind=kind, threshold=threshold, max_cached_steps=cap,
                      speedup=baseline_s / result["latency_s"])
        report["runs"].append(result)
        spread = result["paired_speedup"]
        logger.info("%s: %.2fx (paired %.2f-%.2fx over %d repeat(s)), PSNR mean %.2f / worst %.2f dB, SSIM %.4f, "
                    "hit %s, partial %s", label, result["speedup"], spread["min"], spread["max"], args.repeats,
                    result["psnr_mean"], result["psnr_worst"], result["ssim_mean"], result["hit_ratio"], result["partial_ratio"])

    def overhead(m: str) -> None:
        # bookkeeping overhead: the manager installed, decisions made, every block computed
        toggle = (lambda: bench.wrapper.enable_cache(m, cache_ratio_threshold=0.0, motion_threshold=0.0),
                  bench.wrapper.disable_cache)
        toggle[0]()
        forced, _ = bench.measure(f"overhead_{m}", toggle=toggle)
        bench.wrapper.disable_cache()
        report["overhead"][m] = forced["latency_s"] / forced["baseline_latency_s"] - 1
        report["overhead_runs"][m] = {k: forced[k] for k in ("latency_runs_s", "baseline_runs_s")}
        ratios = [c / b - 1 for base, cached in zip(forced["baseline_runs_s"], forced["latency_runs_s"])
                  for b, c in zip(base, cached)]  # per pair: forced-off / uncached - 1
        report["overhead_spread"][m] = {"min": min(ratios), "median": statistics.median(ratios), "max": max(ratios),
                                        "repeats": args.repeats}
        logger.info("overhead %s: %+.1f%% (paired %+.1f%% to %+.1f%%)", m, 100 * report["overhead"][m],
                    100 * report["overhead_spread"][m]["min"], 100 * report["overhead_spread"][m]["max"])

    def ours(method: str, threshold: float, cap: int) -> None:
        config = CacheConfig(
            method=method, cache_ratio_threshold=threshold, motion_threshold=args.motion_threshold,
            max_cached_steps=cap, **({"approximation": args.approximation} if method == "Fast" else {}),
        )
        toggle = (lambda: bench.wrapper.enable_cache(config=config), bench.wrapper.disable_cache)
        toggle[0]()
        suffix = f"_cap{cap}" if cap >= 0 else ""
        result, _ = bench.measure(f"{method}_{threshold:g}{suffix}", references=references, toggle=toggle)
        bench.wrapper.disable_cache()
        record(result, method, threshold, "xfuser", cap)

    def peer_run(peer) -> None:
        toggle = (lambda: peer.enable(bench.pipe), lambda: peer.disable(bench.pipe))
        peer.enable(bench.pipe)
        try:
            result, _ = bench.measure(f"{peer.method}_{peer.threshold:g}", before=lambda: peer.reset(bench.pipe),
                                      references=references, toggle=toggle)
        finally:
            peer.disable(bench.pipe)
        record(result, peer.method, peer.threshold, "peer")

    jobs = [Job("uncached reference", plain, uncached)]
    for method in args.cache_methods:
        if method == "None":
            jobs += [Job(f"overhead {m} (caching forced off)", paired, lambda m=m: overhead(m)) for m in ("Fast", "Fb", "Tea")]
            continue
        for threshold, cap in sweep_points(method, args):
            jobs.append(Job(_label(method, threshold, cap), paired, lambda m=method, t=threshold, c=cap: ours(m, t, c)))
    if args.peers:
        from peers import available_peers

        # peers are only configured here (MagCache calibrates on its first enable): n is known up front
        peers, skipped = available_peers(
            bench.pipe, args.peer_thresholds, calibrate=lambda prompt: bench.run_once(prompt, 0),
            num_inference_steps=args.num_inference_steps,
        )
        report["skipped"] += skipped
        for entry in skipped:
            logger.info("peer %s skipped: %s", entry["name"], entry["reason"])
        jobs += [Job(f"peer {p.method} {p.threshold:g}", paired, lambda p=p: peer_run(p)) for p in peers]

    path = out_dir / "results.json"
    run_jobs(jobs, report, path)
    if args.report:
        from report import main as report_main

        report_main([str(path)])
    return 0


if __name__ == "__main__":
    from xfuser.cli import run_script  # bad input: one `error:` line, exit 2

    run_script(main)
