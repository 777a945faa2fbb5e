"""Report for a cache benchmark run: comparison grid, charts, HTML page and a performance page.

    python benchmark/report.py benchmark_results/results.json
    python benchmark/report.py results.json --output_dir report/ --performance_md docs/performance/pixart.md

Input is the ``results.json`` written by ``benchmark/cache_execute.py`` (image paths inside it are
relative to the folder holding it; a partial file from an interrupted run is reported as such).
Every sentence under "Findings" is computed from the numbers in that file; nothing in the report
is a fixed conclusion. Rules that keep it from misleading:

* quality floors apply to a configuration's worst image (its mean is shown beside it);
* every speed-up is against the uncached runs paired with that configuration, and is shown with
  the spread of its per-repeat paired ratios; a speed-up whose spread includes 1.0×, an overhead
  whose spread includes 0, or a lead inside the runner-up's spread is flagged, not claimed; with
  one repeat the report says no spread is available;
* ``hit_ratio`` counts fully skipped blocks only, partially computed ones are ``partial_ratio``.

PSNR may be ``Infinity`` (identical images): tables print "∞"; curves draw it on a labelled line
5 dB above the highest finite value (a fixed far cap would squash every finite difference).
"""
from __future__ import annotations

import argparse
import html
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xfuser.logger import init_logger  # noqa: E402
from xfuser import strict_json  # noqa: E402

logger = init_logger("benchmark.report")

GRID_FLOOR_DB = 25.0
"""A method's run shown in the grid and per-method charts: its fastest run whose worst image is ≥ this."""
FINDING_FLOORS_DB = (30.0, 25.0)
"""PSNR floors (worst image) at which the best speed-ups are tabulated and compared."""
REFERENCE_METHOD = "Fast"
"""The method whose speed–quality curve is tested for dominance over all the others."""

GRID_NAME = "comparison_grid.png"
CHARTS = {
    "latency_speedup.png": "Fastest run per method at PSNR ≥ 25 dB (worst image): its latency beside its own paired "
                           "uncached latency, and the speed-up between them with the min–max of the paired ratios",
    "speed_quality.png": "Speed-up vs worst-image PSNR, one line per (method, cap) series in threshold order; "
                         "horizontal bars: min–max of the paired ratios",
    "hit_ratio_per_step.png": "Fraction of blocks fully skipped per step, and partially computed (dashed), chosen run per method",
    "hit_ratio_per_block.png": "Fraction of steps each block was fully skipped, and partially computed (hatched), chosen run per method",
    "ssim_speedup.png": "Speed-up vs worst-image SSIM, one line per (method, cap) series in threshold order",
}
_MISSING = "—"
_SKIPPED = ("R", "A")
"""Stats actions of a fully skipped block (``P``: computed for a token subset, not skipped)."""


# ---------------------------------------------------------------------------------------- data


def load_results(path: str | Path) -> dict:
    """Read a ``results.json`` (strict JSON as the benchmarks write it; older files with Python's
    ``Infinity``/``NaN`` still load)."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _num(value: Any) -> Optional[float]:
    """``value`` as a float, or None when missing / not a number / NaN (±inf is kept, whether
    written as strict JSON's ``"Infinity"`` or as Python's ``Infinity``)."""
    return strict_json.number(value)


def _nums(values: Optional[Iterable[Any]]) -> list[float]:
    return [v for v in (_num(x) for x in (values or [])) if v is not None]


def _mean(values: Optional[Iterable[Any]]) -> Optional[float]:
    nums = _nums(values)
    return sum(nums) / len(nums) if nums else None


def worst(run: dict, key: str = "psnr") -> Optional[float]:
    """The configuration's worst image by ``key`` (a per-image list), else its ``<key>_worst``
    field; None when neither is there or an image's value is missing (a mean, or the images
    that happen to have a value, never stand in for the worst image)."""
    values = run.get(key)
    if not isinstance(values, list) or not values:
        return _num(run.get(f"{key}_worst"))
    nums = [_num(v) for v in values]
    return None if None in nums else min(nums)


def _quality_key(run: dict) -> float:
    """Worst-image PSNR for comparisons: missing counts as -inf."""
    v = worst(run)
    return -math.inf if v is None else v


def methods(results: dict) -> list[str]:
    """Method names in report order: xfuser methods first, then peers, each in file order."""
    order: dict[str, str] = {}
    for run in results.get("runs", []):
        order.setdefault(run["method"], run.get("kind", "xfuser"))
    return [m for m, k in order.items() if k != "peer"] + [m for m, k in order.items() if k == "peer"]


def runs_of(results: dict, method: str) -> list[dict]:
    """The runs of ``method`` in file order."""
    return [r for r in results.get("runs", []) if r["method"] == method]


def best_speedups(results: dict, psnr_floor: float) -> dict[str, dict | None]:
    """Per method, the run with the highest speed-up whose worst image has PSNR ≥ ``psnr_floor``
    (None if none): a mean above the floor can hide an image far below it."""
    best: dict[str, dict | None] = {}
    for method in methods(results):
        eligible = [
            r for r in runs_of(results, method)
            if _num(r.get("speedup")) is not None and _quality_key(r) >= psnr_floor
        ]
        best[method] = max(eligible, key=lambda r: _num(r["speedup"])) if eligible else None
    return best


def chosen_runs(results: dict, psnr_floor: float = GRID_FLOOR_DB) -> dict[str, tuple[dict, bool]]:
    """Per method, (run, meets_floor): its fastest run at ``psnr_floor``, else its lowest-threshold run."""
    chosen: dict[str, tuple[dict, bool]] = {}
    for method, best in best_speedups(results, psnr_floor).items():
        if best is not None:
            chosen[method] = (best, True)
            continue
        runs = runs_of(results, method)
        with_threshold = [r for r in runs if _num(r.get("threshold")) is not None]
        if with_threshold:
            chosen[method] = (min(with_threshold, key=lambda r: _num(r["threshold"])), False)
        else:  # no thresholds: the most faithful run
            chosen[method] = (max(runs, key=_quality_key), False)
    return chosen


def undominated_runs(results: dict, method: str = REFERENCE_METHOD) -> list[dict]:
    """Runs of other methods that no run of ``method`` matches in both speed-up and worst-image PSNR.

    ``method``'s curve dominates when this is empty: for every other run there is a ``method`` run
    with ≥ speed-up and ≥ PSNR. Runs without a speed-up or PSNR are left out on both sides.
    """
    def point(run: dict) -> Optional[tuple[float, float]]:
        s, p = _num(run.get("speedup")), worst(run)
        return None if s is None or p is None else (s, p)

    own = [p for p in (point(r) for r in runs_of(results, method)) if p is not None]
    others = [r for r in results.get("runs", []) if r["method"] != method and point(r) is not None]
    return [r for r in others if not any(s >= point(r)[0] and p >= point(r)[1] for s, p in own)]


def series(results: dict) -> dict[tuple[str, int], list[dict]]:
    """Runs grouped by (method, cap on consecutive cached steps; -1 = none), each group in threshold
    order: a speed–quality line joins one knob's settings, never points of different caps."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for method in methods(results):
        for run in runs_of(results, method):
            cap = _num(run.get("max_cached_steps"))
            groups.setdefault((method, -1 if cap is None or cap < 0 else int(cap)), []).append(run)
    for runs in groups.values():
        runs.sort(key=lambda r: (_num(r.get("threshold")) is None, _num(r.get("threshold")) or 0.0))
    return groups


# ------------------------------------------------------------------------------- timing noise


@dataclass(frozen=True)
class Spread:
    """min/median/max of a configuration's per-repeat paired ratios (each cached run against the
    uncached run right before it), over ``repeats`` repeats of every case. Pooling the cases adds
    their real differences (one prompt caches more than another) to the machine's noise, so the
    interval is a conservative bound: an effect outside it is not noise."""

    low: float
    median: float
    high: float
    repeats: int

    @property
    def available(self) -> bool:
        """One repeat per case gives one pair per case: no repeat-to-repeat spread."""
        return self.repeats >= 2

    def includes(self, value: float) -> bool:
        return self.low <= value <= self.high


def _pairs(base_runs: Any, runs: Any) -> tuple[list[tuple[float, float]], int]:
    """(uncached, cached) seconds of every (case, repeat) pair, and the repeats per case."""
    if not isinstance(base_runs, list) or not isinstance(runs, list) or not runs:
        return [], 0
    pairs, repeats = [], None
    for base, cached in zip(base_runs, runs):
        case = [(b, c) for b, c in zip(_nums(base), _nums(cached)) if b > 0 and c > 0]
        pairs += case
        repeats = len(case) if repeats is None else min(repeats, len(case))
    return pairs, repeats or 0


def _spread(values: list[float], repeats: int) -> Optional[Spread]:
    return Spread(min(values), statistics.median(values), max(values), repeats) if values else None


def speedup_spread(run: dict) -> Optional[Spread]:
    """Spread of uncached / cached over the run's pairs; None without per-repeat timings."""
    pairs, repeats = _pairs(run.get("baseline_runs_s"), run.get("latency_runs_s"))
    return _spread([b / c for b, c in pairs], repeats)


def overhead_spread(results: dict, method: str) -> Optional[Spread]:
    """Spread of forced-off / uncached - 1 over the overhead measurement's pairs."""
    timings = (results.get("overhead_runs") or {}).get(method) or {}
    pairs, repeats = _pairs(timings.get("baseline_runs_s"), timings.get("latency_runs_s"))
    return _spread([c / b - 1 for b, c in pairs], repeats)


def timing_verdict(spread: Optional[Spread], null: float = 1.0) -> str:
    """Whether an effect stands out of its noise: "within noise" when the spread includes
    ``null`` (1.0 for a speed-up, 0 for an overhead)."""
    if spread is None:
        return "no per-repeat timings"
    if not spread.available:
        return "no spread (1 repeat)"
    return "within noise" if spread.includes(null) else "outside noise"


def _established(spread: Optional[Spread], null: float = 1.0) -> bool:
    return timing_verdict(spread, null) == "outside noise"


def clearly_faster(a: dict, b: dict) -> Optional[bool]:
    """True when ``a``'s slowest paired ratio beats ``b``'s fastest, False when the spreads
    overlap, None when either has no spread."""
    sa, sb = speedup_spread(a), speedup_spread(b)
    if sa is None or sb is None or not (sa.available and sb.available):
        return None
    return sa.low > sb.high


# ---------------------------------------------------------------------------------- formatting


def fmt_psnr(value: Any) -> str:
    """PSNR in dB for tables: "∞" for identical images, "—" when missing."""
    v = _num(value)
    if v is None:
        return _MISSING
    return "∞" if math.isinf(v) else f"{v:.2f}"


def _fmt(value: Any, spec: str = ".3f", suffix: str = "") -> str:
    v = _num(value)
    return _MISSING if v is None else f"{v:{spec}}{suffix}"


def fmt_threshold(value: Any) -> str:
    """Threshold as written in the sweep (``0.05``), "—" when the run has none."""
    return _fmt(value, "g")


def fmt_cap(run: dict) -> str:
    cap = _num(run.get("max_cached_steps"))
    return f"{cap:g}" if cap is not None and cap >= 0 else "none"


def fmt_setting(run: dict) -> str:
    """A run's knob values: the threshold, plus the cap on consecutive cached steps when set."""
    cap = fmt_cap(run)
    return fmt_threshold(run.get("threshold")) + (f", cap {cap}" if cap != "none" else "")


def fmt_speedup(value: Any) -> str:
    return _fmt(value, ".2f", "×")


def fmt_spread(spread: Optional[Spread], null: float = 1.0, percent: bool = False, verdict: bool = True) -> str:
    """"1.85× to 2.10× (median 1.98×, 3 repeats)", plus "; within noise" (``verdict``) when the
    spread includes ``null``; why there is none when it is missing."""
    status = timing_verdict(spread, null)
    if spread is None or not spread.available:
        return status
    f = (lambda v: f"{v:+.1%}") if percent else (lambda v: f"{v:.2f}×")
    text = f"{f(spread.low)} to {f(spread.high)} (median {f(spread.median)}, {spread.repeats} repeats)"
    return text + ("; within noise" if verdict and status == "within noise" else "")


def _run_rel_l2(run: dict) -> Optional[float]:
    return _num(run.get("rel_l2_mean")) if "rel_l2_mean" in run else _mean(run.get("rel_l2_latents"))


def _fmt_mib(value: Any) -> str:
    value = _num(value)
    return _MISSING if value is None else f"{value / 2**20:.1f}"


RUN_COLUMNS = ["Run", "Method", "Kind", "Threshold", "Cap", "Uncached (paired)", "Latency", "Speed-up",
               "Paired speed-up spread", "PSNR worst (dB)", "PSNR mean (dB)", "SSIM worst", "SSIM mean",
               "Rel. L2 (latents)", "LPIPS", "Hit ratio (fully skipped)", "Partial ratio", "Compute fraction",
               "Cache state (MiB)", "Peak memory (MiB)"]


def _run_row(run: dict) -> list[str]:
    """One run as table cells, in ``RUN_COLUMNS`` order."""
    lpips = _num(run.get("lpips_mean"))
    return [
        str(run.get("label", run["method"])), str(run["method"]), str(run.get("kind", "xfuser")),
        fmt_threshold(run.get("threshold")), fmt_cap(run), _fmt(run.get("baseline_latency_s"), ".3f", " s"),
        _fmt(run.get("latency_s"), ".3f", " s"), fmt_speedup(run.get("speedup")), fmt_spread(speedup_spread(run)),
        fmt_psnr(worst(run)), fmt_psnr(run.get("psnr_mean")), _fmt(worst(run, "ssim"), ".4f"),
        _fmt(run.get("ssim_mean"), ".4f"), _fmt(_run_rel_l2(run), ".4f"),
        "skipped" if lpips is None else f"{lpips:.4f}", _fmt(run.get("hit_ratio"), ".2f"),
        _fmt(run.get("partial_ratio"), ".2f"), _fmt(run.get("compute_fraction"), ".2f"),
        _fmt_mib(run.get("cache_state_bytes")), _fmt_mib(run.get("peak_memory_bytes")),
    ]


def _claim(run: dict) -> str:
    """A speed-up as claimed in a finding: the value with its spread (or why it has none)."""
    spread = speedup_spread(run)
    paired = "paired " if spread is not None and spread.available else ""
    return f"{fmt_speedup(run.get('speedup'))} [{paired}{fmt_spread(spread)}]"


def _short_spread(run: dict) -> str:
    """"paired 1.92–2.00×" for tight spaces (grid titles); "no spread" when there is none."""
    spread = speedup_spread(run)
    if spread is None or not spread.available:
        return "no spread"
    return f"paired {spread.low:.2f}–{spread.high:.2f}×" + (", within noise" if spread.includes(1.0) else "")


def _best_cell(run: Optional[dict]) -> str:
    if run is None:
        return _MISSING
    return (f"{_claim(run)} (thr {fmt_setting(run)}, worst {fmt_psnr(worst(run))} dB, "
            f"mean {fmt_psnr(run.get('psnr_mean'))} dB)")


def _best_rows(results: dict) -> list[list[str]]:
    bests = [best_speedups(results, floor) for floor in FINDING_FLOORS_DB]
    return [[m] + [_best_cell(b[m]) for b in bests] for m in methods(results)]


def _best_columns() -> list[str]:
    return ["Method"] + [f"Best speed-up at PSNR ≥ {floor:g} dB (worst image)" for floor in FINDING_FLOORS_DB]


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


# ------------------------------------------------------------------------------------ findings


def _progress_findings(results: dict) -> list[str]:
    progress = results.get("progress") or {}
    if progress and not progress.get("complete", True):
        return [f"This run is incomplete: {progress.get('finished', '?')} of {progress.get('total', '?')} "
                "configurations finished; everything below covers those only."]
    return []


def _baseline_findings(results: dict) -> list[str]:
    out = []
    baseline = results.get("baseline") or {}
    n_cases = len(results.get("cases", []))
    if _num(baseline.get("latency_s")) is not None:
        out.append(f"The uncached baseline's median latency is {baseline['latency_s']:.3f} s over {n_cases} case(s).")
    paired = _nums(r.get("baseline_latency_s") for r in results.get("runs", []))
    if paired:
        out.append(f"Each speed-up is against the uncached runs paired with its own configuration (their median "
                   f"latency ranges {min(paired):.3f}–{max(paired):.3f} s), not against that single baseline.")
    spreads = [speedup_spread(r) for r in results.get("runs", [])]
    if results.get("runs") and not any(s is not None and s.available for s in spreads):
        out.append("No configuration has more than one repeat per case: no spread is available, so no speed-up, "
                   "ranking or overhead below is established as a finding.")
    noisy = [r.get("label", r["method"]) for r, s in zip(results.get("runs", []), spreads)
             if timing_verdict(s) == "within noise"]
    if noisy:
        out.append(f"{len(noisy)} of {len(spreads)} configurations have a paired speed-up spread that includes 1.0×: "
                   f"their speed-up is within the machine's noise, not a finding ({_join(noisy[:6])}"
                   f"{', …' if len(noisy) > 6 else ''}).")
    return out


def _lead_sentence(ranked: list[tuple[str, dict]], floor: float) -> str:
    top = _num(ranked[0][1]["speedup"])
    leaders = [m for m, r in ranked if _num(r["speedup"]) == top]
    rest = [(m, r) for m, r in ranked if m not in leaders]
    if len(leaders) > 1:
        return f"{_join(leaders)} tie for the lead at PSNR ≥ {floor:g} dB with {fmt_speedup(top)}."
    lead, runner = ranked[0], rest[0] if rest else None
    if runner is None:
        return f"{lead[0]} leads at PSNR ≥ {floor:g} dB with {fmt_speedup(top)}."
    clear = clearly_faster(lead[1], runner[1])
    if clear:
        return (f"{lead[0]} leads at PSNR ≥ {floor:g} dB with {fmt_speedup(top)}; "
                f"the runner-up is {runner[0]} with {fmt_speedup(runner[1]['speedup'])}.")
    head = (f"{lead[0]} has the highest speed-up at PSNR ≥ {floor:g} dB ({fmt_speedup(top)}; runner-up "
            f"{runner[0]} with {fmt_speedup(runner[1]['speedup'])})")
    if clear is None:
        return head + ", but without a spread for both the ranking is not established."
    return head + ", but their paired spreads overlap: no clear leader."


def _floor_findings(results: dict) -> list[str]:
    out = []
    for floor in FINDING_FLOORS_DB:
        best = best_speedups(results, floor)
        reached = {m: r for m, r in best.items() if r is not None}
        missing = [m for m, r in best.items() if r is None]
        if not reached:
            out.append(f"No method reaches PSNR ≥ {floor:g} dB on every image of these cases.")
            continue
        parts = [f"{m} {_claim(r)} (threshold {fmt_setting(r)}, worst {fmt_psnr(worst(r))} dB, "
                 f"mean {fmt_psnr(r.get('psnr_mean'))} dB)" for m, r in reached.items()]
        sentence = f"Best speed-up at PSNR ≥ {floor:g} dB on every image: {_join(parts)}."
        if missing:
            sentence += f" {_join(missing)} {'has' if len(missing) == 1 else 'have'} no run at that quality."
        out.append(sentence)
        out.append(_lead_sentence(sorted(reached.items(), key=lambda kv: -_num(kv[1]["speedup"])), floor))
    return out


def _dominance_findings(results: dict, all_methods: list[str]) -> list[str]:
    ref, others = REFERENCE_METHOD, [m for m in all_methods if m != REFERENCE_METHOD]
    n_other = sum(1 for r in results.get("runs", []) if r["method"] != ref
                  and _num(r.get("speedup")) is not None and worst(r) is not None)
    if ref not in all_methods:
        return [f"There are no {ref} runs, so its speed–quality dominance is not assessed."]
    if not others or n_other == 0:
        return [f"Only {ref} has runs with speed-up and PSNR, so there is nothing to compare its curve against."]
    beaten = undominated_runs(results, ref)
    if not beaten:
        return [f"{ref}'s speed–quality curve dominates the others: each of the {n_other} runs of "
                f"{_join(others)} is matched or beaten in both speed-up and worst-image PSNR by some {ref} run "
                "(point values; see each speed-up's spread)."]
    examples = "; ".join(f"{r.get('label', r['method'])}: {_claim(r)} at {fmt_psnr(worst(r))} dB" for r in beaten[:3])
    return [f"{ref}'s speed–quality curve does not dominate the others: {len(beaten)} of {n_other} "
            f"other runs have no {ref} run with both a higher-or-equal speed-up and worst-image PSNR ({examples})."]


def _hit_findings(results: dict) -> list[str]:
    out = []
    chosen = chosen_runs(results)
    hits = []
    for m, (r, _) in chosen.items():
        if _num(r.get("hit_ratio")) is None:
            continue
        partial = _num(r.get("partial_ratio"))
        extra = f", partially computed {partial:.2f}" if partial else ""
        hits.append(f"{m} {r['hit_ratio']:.2f}{extra} (threshold {fmt_setting(r)})")
    if hits:
        out.append(f"Fraction of block evaluations fully skipped (hit ratio) in each method's chosen run: {_join(hits)}.")
    below = [m for m, (_, ok) in chosen.items() if not ok]
    if below:
        out.append(f"{_join(below)} {'has' if len(below) == 1 else 'have'} no run at PSNR ≥ {GRID_FLOOR_DB:g} dB "
                   "on every image; the grid and charts show the lowest threshold instead.")
    return out


def _overhead_findings(results: dict) -> list[str]:
    """The forced-off slowdowns: claimed only where the paired spread excludes 0."""
    overhead = {m: _num(v) for m, v in (results.get("overhead") or {}).items() if _num(v) is not None}
    if not overhead:
        return ["The caching overhead (caching forced off) was not measured."]
    spreads = {m: overhead_spread(results, m) for m in overhead}
    real = [m for m, s in spreads.items() if _established(s, 0.0)]
    noise = [m for m, s in spreads.items() if timing_verdict(s, 0.0) == "within noise"]
    unknown = [m for m in overhead if m not in real and m not in noise]

    def cite(ms: list[str]) -> str:
        return _join([f"{m} {overhead[m]:.1%} (paired {fmt_spread(spreads[m], 0.0, True, False)})" for m in ms])

    out = []
    if real:
        out.append(f"With caching forced off, the bookkeeping measurably changes the latency: {cite(real)}.")
    if noise:
        lead = "Smaller than its noise, so not a finding" if real else \
            "With caching forced off, no bookkeeping overhead stands out of the timing noise"
        out.append(f"{lead}: {cite(noise)}.")
    if unknown:
        hi, lo = max(unknown, key=overhead.get), min(unknown, key=overhead.get)
        span = f"at most {overhead[hi]:.1%} ({hi})" + (f" and at least {overhead[lo]:.1%} ({lo})" if lo != hi else "")
        out.append(f"With caching forced off, the measured slowdown is {span}, but no spread is available, "
                   "so it is not established.")
    return out


def findings(results: dict) -> list[str]:
    """Plain-text sentences, every one computed from ``results``."""
    out = _progress_findings(results) + _baseline_findings(results)
    all_methods = methods(results)
    if not all_methods:
        out.append("The results hold no cached runs.")
        return out
    out += _floor_findings(results) + _dominance_findings(results, all_methods)
    out += _hit_findings(results) + _overhead_findings(results)
    skipped = results.get("skipped") or []
    if skipped:
        names = _join([str(s.get("name")) for s in skipped])
        out.append(f"{len(skipped)} peer implementation{' was' if len(skipped) == 1 else 's were'} skipped: {names}.")
    lpips = results.get("lpips") or {}
    if lpips and not lpips.get("available", False):
        out.append(f"LPIPS was not computed ({lpips.get('reason', 'no reason given')}).")
    return out


# ------------------------------------------------------------------------------------- figures


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png")
    logger.info("wrote %s", path)
    return path


def _load_image(path: Path, size: tuple[int, int]) -> np.ndarray:
    """The image as RGB array; a grey placeholder (and a warning) when it cannot be read."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as exc:
        logger.warning("comparison grid: cannot read %s (%s)", path, exc)
        return np.full((size[0], size[1], 3), 200, dtype=np.uint8)


def _case_image(run_images: list, case: int, root: Path, size: tuple[int, int]) -> tuple[np.ndarray, bool]:
    if case < len(run_images) and run_images[case]:
        path = root / run_images[case]
        return _load_image(path, size), path.is_file()
    return np.full((size[0], size[1], 3), 200, dtype=np.uint8), False


def make_grid(results: dict, out_dir: str | Path, image_root: str | Path | None = None) -> Path:
    """Write ``comparison_grid.png``: one row per case; uncached, then each method's chosen run.

    ``image_root`` is where the image paths in ``results`` are relative to (default ``out_dir``).
    A method's column shows its fastest run whose worst image has PSNR ≥ 25 dB, or its lowest threshold.
    """
    out_dir = Path(out_dir)
    root = Path(image_root) if image_root is not None else out_dir
    size = (int(results.get("height") or 64), int(results.get("width") or 64))
    cases = results.get("cases") or [["", None]] * len(results.get("baseline", {}).get("images", []))
    chosen = chosen_runs(results)
    columns: list[tuple[str, list, Optional[dict], bool]] = [("Uncached", results.get("baseline", {}).get("images", []), None, True)]
    columns += [(m, r.get("images") or [], r, ok) for m, (r, ok) in chosen.items()]
    n_rows, n_cols = max(1, len(cases)), len(columns)
    fig = Figure(figsize=(2.3 * n_cols, 2.7 * n_rows + 0.3), dpi=100, layout="constrained")
    axes = np.atleast_2d(fig.subplots(n_rows, n_cols, squeeze=False))
    for row in range(n_rows):
        for col, (name, images, run, ok) in enumerate(columns):
            ax = axes[row, col]
            image, found = _case_image(images, row, root, size)
            ax.imshow(image)
            ax.set_xticks([])
            ax.set_yticks([])
            if not found:
                ax.text(0.5, 0.5, "missing", ha="center", va="center", transform=ax.transAxes)
            if run is None:
                title = "Uncached\nreference"
            else:
                psnr = (run.get("psnr") or [None] * n_rows)
                case_psnr = psnr[row] if row < len(psnr) else None
                flag = "" if ok else f" (<{GRID_FLOOR_DB:g} dB)"
                title = (f"{name} thr {fmt_setting(run)}{flag}\n"
                         f"{fmt_speedup(run.get('speedup'))} ({_short_spread(run)})\n{fmt_psnr(case_psnr)} dB")
            ax.set_title(title, fontsize=8)
            if col == 0 and row < len(cases):
                prompt, seed = (list(cases[row]) + [None, None])[:2]
                text = str(prompt) if len(str(prompt)) <= 28 else str(prompt)[:27] + "…"
                ax.set_ylabel(f"{text}\nseed {seed}", fontsize=7)
    return _save(fig, out_dir / GRID_NAME)



def _xerr(runs: list[dict]) -> Optional[np.ndarray]:
    """Horizontal error bars: each run's paired min–max around its speed-up (0 where none)."""
    lo, hi = [], []
    for run in runs:
        s, spread = _num(run.get("speedup")), speedup_spread(run)
        ok = s is not None and spread is not None and spread.available
        lo.append(max(s - spread.low, 0.0) if ok else 0.0)
        hi.append(max(spread.high - s, 0.0) if ok else 0.0)
    return np.array([lo, hi]) if any(lo) or any(hi) else None


def latency_bars(results: dict) -> list[tuple[str, dict, float, float]]:
    """(method, run, paired uncached s, cached s) of each method's chosen run at the grid floor:
    the latency panel and the speed-up panel both use that run's own baseline."""
    return [(m, r, _num(r["baseline_latency_s"]), _num(r["latency_s"]))
            for m, r in best_speedups(results, GRID_FLOOR_DB).items()
            if r is not None and _num(r.get("latency_s")) and _num(r.get("baseline_latency_s")) is not None]


def _chart_latency(results: dict, path: Path) -> Optional[Path]:
    rows = latency_bars(results)
    if not rows:
        return None
    names = [f"{m}\nthr {fmt_setting(r)}" for m, r, _, _ in rows]
    fig = Figure(figsize=(max(6.0, 1.9 * len(rows)), 4.2), dpi=100, layout="constrained")
    ax_lat, ax_speed = fig.subplots(1, 2)
    x = np.arange(len(rows))
    base = ax_lat.bar(x - 0.2, [b for *_, b, _ in rows], 0.4, color="tab:gray", label="uncached (paired)")
    cached = ax_lat.bar(x + 0.2, [c for *_, c in rows], 0.4, color="tab:blue", label="cached")
    for bars in (base, cached):
        ax_lat.bar_label(bars, fmt="%.3f", fontsize=6)
    ax_lat.set_ylabel("latency (s)")
    ax_lat.legend(fontsize=7)
    speedups = [b / c for *_, b, c in rows]
    err = _xerr([r for _, r, _, _ in rows])
    bars = ax_speed.bar(x, speedups, color="tab:green", yerr=err, capsize=4)
    ax_speed.bar_label(bars, fmt="%.2f×", fontsize=7, padding=8)
    ax_speed.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax_speed.set_ylabel("speed-up (×), bars: paired min–max")
    for ax in (ax_lat, ax_speed):
        ax.set_xticks(x, names, fontsize=7, rotation=30, ha="right")
        ax.margins(y=0.12)
    fig.suptitle(f"Fastest run per method at PSNR ≥ {GRID_FLOOR_DB:g} dB (worst image),\n"
                 "each against the uncached runs paired with it", fontsize=10)
    return _save(fig, path)


def _series_label(method: str, cap: int) -> str:
    return f"{method} " + (f"cap {cap}" if cap >= 0 else "no cap")


def infinity_height(psnrs: list[float], margin_db: float = 5.0) -> float:
    """Where a curve draws PSNR ∞ (identical to uncached): ``margin_db`` above the highest finite
    value, so the finite differences keep the axis (a far cap such as 100 dB squashed them)."""
    finite = [p for p in psnrs if math.isfinite(p)]
    return (max(finite) if finite else 40.0) + margin_db


def _chart_curves(results: dict, path: Path, key: str, ylabel: str, psnr: bool) -> Optional[Path]:
    """One line per (method, cap) series through its thresholds; y is the worst image's ``key``."""
    lines = []
    for (method, cap), runs in series(results).items():
        runs = [r for r in runs if _num(r.get("speedup")) is not None and worst(r, key) is not None]
        if runs:
            lines.append((method, cap, runs, [worst(r, key) for r in runs]))
    if not lines:
        return None
    infinity_at = None
    if psnr:
        infinity_at = infinity_height([y for *_, ys in lines for y in ys])
        lines = [(m, c, rs, [infinity_at if math.isinf(y) else y for y in ys]) for m, c, rs, ys in lines]
    kinds = {r["method"]: r.get("kind", "xfuser") for r in results.get("runs", [])}
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods(results))}
    markers = "osD^vP*X"
    fig = Figure(figsize=(7.0, 4.8), dpi=100, layout="constrained")
    ax = fig.subplots()
    for method, cap, runs, ys in lines:
        ax.errorbar([_num(r["speedup"]) for r in runs], ys, xerr=_xerr(runs), color=colors[method],
                    marker=markers[(cap + 1) % len(markers)], capsize=2, elinewidth=0.8,
                    ls="--" if kinds.get(method) == "peer" else "-", label=_series_label(method, cap))
    if psnr:
        for floor in sorted(FINDING_FLOORS_DB):
            ax.axhline(floor, color="grey", lw=0.8, ls=":")
            ax.text(0.01, floor, f"{floor:g} dB", transform=ax.get_yaxis_transform(), va="bottom", fontsize=7, color="grey")
        if any(y == infinity_at for *_, ys in lines for y in ys):
            ax.axhline(infinity_at, color="black", lw=0.8, ls="-.")
            ax.text(0.99, infinity_at, "∞: identical to uncached", transform=ax.get_yaxis_transform(), ha="right",
                    va="bottom", fontsize=7)
    ax.axvline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("speed-up (×)")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def per_step_fractions(stats: dict) -> list[tuple[int, float, float]]:
    """(step, fully skipped fraction, partially computed fraction) of a run's blocks per step."""
    out = []
    for i, entry in enumerate(stats.get("per_step") or []):
        actions = str(entry.get("actions") or "")
        if actions:
            out.append((int(entry.get("step", i)), sum(a in _SKIPPED for a in actions) / len(actions),
                        actions.count("P") / len(actions)))
    return out


def per_block_fractions(stats: dict) -> list[tuple[int, float, float]]:
    """(block, fraction of steps fully skipped, fraction partially computed)."""
    steps = _num(stats.get("num_steps"))
    if not steps:
        return []
    return [(int(b.get("block", i)), ((_num(b.get("reused")) or 0.0) + (_num(b.get("approximated")) or 0.0)) / steps,
             (_num(b.get("partial")) or 0.0) / steps) for i, b in enumerate(stats.get("per_block") or [])]


def _xfuser_stats(results: dict) -> dict[str, tuple[dict, dict]]:
    kinds = {r["method"]: r.get("kind", "xfuser") for r in results.get("runs", [])}
    return {m: (r, r["stats"]) for m, (r, _) in chosen_runs(results).items()
            if kinds.get(m) != "peer" and isinstance(r.get("stats"), dict)}


def _chart_per_step(results: dict, path: Path) -> Optional[Path]:
    data = {m: (r, per_step_fractions(s)) for m, (r, s) in _xfuser_stats(results).items()}
    data = {m: v for m, v in data.items() if v[1]}
    if not data:
        return None
    fig = Figure(figsize=(6.5, 4.0), dpi=100, layout="constrained")
    ax = fig.subplots()
    for i, (method, (run, points)) in enumerate(data.items()):
        steps = [p[0] for p in points]
        ax.plot(steps, [p[1] for p in points], marker="o", ms=4, alpha=0.8, color=f"C{i}",
                label=f"{method} thr {fmt_setting(run)}: fully skipped")
        if any(p[2] for p in points):
            ax.plot(steps, [p[2] for p in points], marker="x", ms=4, alpha=0.8, ls="--", color=f"C{i}",
                    label=f"{method}: partially computed")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("denoising step")
    ax.set_ylabel("fraction of blocks")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _chart_per_block(results: dict, path: Path) -> Optional[Path]:
    data = {m: (r, per_block_fractions(s)) for m, (r, s) in _xfuser_stats(results).items()}
    data = {m: v for m, v in data.items() if v[1]}
    if not data:
        return None
    fig = Figure(figsize=(6.5, 4.0), dpi=100, layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(data)
    for i, (method, (run, points)) in enumerate(data.items()):
        x = np.array([p[0] for p in points]) + (i - (len(data) - 1) / 2) * width
        skipped = [p[1] for p in points]
        ax.bar(x, skipped, width=width, color=f"C{i}", label=f"{method} thr {fmt_setting(run)}: fully skipped")
        if any(p[2] for p in points):
            ax.bar(x, [p[2] for p in points], width=width, bottom=skipped, color=f"C{i}", alpha=0.4, hatch="//",
                   label=f"{method}: partially computed")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("block")
    ax.set_ylabel("fraction of steps")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    return _save(fig, path)


def make_charts(results: dict, out_dir: str | Path) -> list[Path]:
    """Write the PNG charts whose data is present (names in ``CHARTS``); return their paths."""
    out_dir = Path(out_dir)
    makers = {
        "latency_speedup.png": _chart_latency,
        "speed_quality.png": lambda r, p: _chart_curves(r, p, "psnr", "PSNR of the worst image (dB)", psnr=True),
        "hit_ratio_per_step.png": _chart_per_step,
        "hit_ratio_per_block.png": _chart_per_block,
        "ssim_speedup.png": lambda r, p: _chart_curves(r, p, "ssim", "SSIM of the worst image", psnr=False),
    }
    written = []
    for name, maker in makers.items():
        path = maker(results, out_dir / name)
        if path is None:
            logger.info("chart %s skipped: no data", name)
        else:
            written.append(path)
    return written


# ---------------------------------------------------------------------------------------- HTML


def _html_table(columns: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "\n".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


_CSS = """body{font-family:sans-serif;max-width:1200px;margin:1em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:0.9em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}th{background:#eee}
img{max-width:100%;border:1px solid #ddd}figure{margin:1em 0}figcaption{font-size:0.9em;color:#555}
dt{font-weight:bold;float:left;clear:left;width:9em}dd{margin-left:10em}"""


OVERHEAD_COLUMNS = ["Method", "Slowdown vs uncached", "Paired spread", "Verdict"]


def _overhead_rows(results: dict) -> list[list[str]]:
    rows = []
    for m, v in (results.get("overhead") or {}).items():
        spread = overhead_spread(results, m)
        rows.append([m, _fmt(v, ".1%"), fmt_spread(spread, 0.0, True, False), timing_verdict(spread, 0.0)])
    return rows


def _header_items(results: dict) -> list[tuple[str, str]]:
    return [
        ("Model", f"{results.get('model', _MISSING)} ({results.get('model_type', _MISSING)})"),
        ("Date", str(results.get("date", _MISSING))),
        ("Machine", str(results.get("machine", _MISSING))),
        ("Command", str(results.get("command", _MISSING))),
        ("Steps", str(results.get("num_inference_steps", _MISSING))),
        ("Size", f"{results.get('height', '?')}×{results.get('width', '?')}"),
        ("Cases", str(len(results.get("cases", [])))),
        ("Repeats", str(results.get("repeats", _MISSING))),
        ("Finished", _progress_text(results)),
    ]


def _progress_text(results: dict) -> str:
    progress = results.get("progress")
    if not progress:
        return _MISSING
    state = "complete" if progress.get("complete") else "incomplete"
    return f"{progress.get('finished', '?')} of {progress.get('total', '?')} configurations ({state})"


def write_html(results: dict, out_dir: str | Path, grid: Path | None = None, charts: list[Path] | None = None) -> Path:
    """Write ``report.html`` in ``out_dir`` (inline CSS, links only to PNGs in ``out_dir``).

    ``grid`` / ``charts`` default to the files of those names already present in ``out_dir``.
    """
    out_dir = Path(out_dir)
    grid = grid if grid is not None else out_dir / GRID_NAME
    charts = charts if charts is not None else [out_dir / n for n in CHARTS]
    esc = html.escape
    parts = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f"<title>Cache benchmark: {esc(str(results.get('model', '')))}</title>", f"<style>{_CSS}</style>", "</head>",
        "<body>", f"<h1>Cache benchmark: {esc(str(results.get('model', '')))}</h1>", "<dl>",
    ]
    parts += [f"<dt>{esc(k)}</dt><dd>{'<code>' + esc(v) + '</code>' if k == 'Command' else esc(v)}</dd>"
              for k, v in _header_items(results)]
    parts.append("</dl>")
    cases = results.get("cases", [])
    if cases:
        parts.append(_html_table(["Case", "Prompt", "Seed"], [[str(i), str(c[0]), str(c[1])] for i, c in enumerate(cases)]))

    parts += ["<h2>Findings</h2>", "<ul>"] + [f"<li>{esc(s)}</li>" for s in findings(results)] + ["</ul>"]
    parts += ["<h2>Best speed-up at each quality floor</h2>", _html_table(_best_columns(), _best_rows(results))]

    parts.append("<h2>Comparison grid</h2>")
    if Path(grid).is_file():
        parts.append(f'<figure><img src="{esc(Path(grid).name)}" alt="comparison grid"><figcaption>Uncached vs each '
                     f"method's fastest run whose worst image has PSNR ≥ {GRID_FLOOR_DB:g} dB (or its lowest threshold)."
                     "</figcaption></figure>")
    else:
        parts.append("<p>No comparison grid was generated.</p>")

    parts.append("<h2>Charts</h2>")
    present = [Path(c) for c in charts if Path(c).is_file()]
    for chart in present:
        caption = CHARTS.get(chart.name, chart.stem)
        parts.append(f'<figure><img src="{esc(chart.name)}" alt="{esc(caption)}"><figcaption>{esc(caption)}</figcaption></figure>')
    if not present:
        parts.append("<p>No charts were generated.</p>")

    parts += ["<h2>All runs</h2>", _html_table(RUN_COLUMNS, [_run_row(r) for r in results.get("runs", [])])]
    lpips = results.get("lpips") or {}
    if lpips and not lpips.get("available", False):
        parts.append(f"<p>LPIPS: {esc(str(lpips.get('reason', 'skipped')))}</p>")

    parts.append("<h2>Caching overhead (caching forced off)</h2>")
    overhead = results.get("overhead") or {}
    if overhead:
        parts.append(_html_table(OVERHEAD_COLUMNS, _overhead_rows(results)))
    else:
        parts.append("<p>Not measured.</p>")

    parts.append("<h2>Skipped peers</h2>")
    skipped = results.get("skipped") or []
    if skipped:
        parts.append(_html_table(["Peer", "Reason"], [[str(s.get("name", "")), str(s.get("reason", ""))] for s in skipped]))
    else:
        parts.append("<p>None.</p>")
    parts += ["<p><small>Generated by benchmark/report.py from results.json.</small></p>", "</body>", "</html>"]

    path = out_dir / "report.html"
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")
    logger.info("wrote %s", path)
    return path


# ------------------------------------------------------------------------------------ markdown


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(columns: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(_md_cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]


def write_performance_md(results: dict, path: str | Path) -> Path:
    """Write the markdown performance page (for ``docs/performance/<model>.md``)."""
    path = Path(path)
    lines = [
        "<!-- Generated by benchmark/report.py from results.json; regenerate instead of editing. -->",
        f"# Cache performance: {results.get('model', _MISSING)}", "",
        "_Generated by `benchmark/report.py` from `results.json`._", "",
    ]
    for key, value in _header_items(results):
        lines.append(f"- **{key}:** `{value}`" if key == "Command" else f"- **{key}:** {value}")
    lines += ["", "## Best speed-up at each quality floor", ""] + _md_table(_best_columns(), _best_rows(results))
    lines += ["", "## Findings", ""] + [f"- {s}" for s in findings(results)]
    lines += ["", "## All runs", ""] + _md_table(RUN_COLUMNS, [_run_row(r) for r in results.get("runs", [])])
    if results.get("overhead"):
        lines += ["", "## Caching overhead (caching forced off)", ""] + _md_table(OVERHEAD_COLUMNS, _overhead_rows(results))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    logger.info("wrote %s", path)
    return path


# ----------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """CLI: grid, charts and report.html (plus the markdown page with ``--performance_md``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results_json", type=Path, help="results.json written by benchmark/cache_execute.py")
    parser.add_argument("--output_dir", type=Path, default=None, help="where to write the report (default: the JSON's folder)")
    parser.add_argument("--performance_md", type=Path, default=None, help="also write this markdown performance page")
    args = parser.parse_args(argv)
    if not args.results_json.is_file():
        logger.error("no such file: %s", args.results_json)
        return 2
    results = load_results(args.results_json)
    out_dir = args.output_dir or args.results_json.resolve().parent
    out_dir.mkdir(parents=True, exist_ok=True)
    grid = make_grid(results, out_dir, image_root=args.results_json.resolve().parent)
    charts = make_charts(results, out_dir)
    report = write_html(results, out_dir, grid=grid, charts=charts)
    if args.performance_md is not None:
        write_performance_md(results, args.performance_md)
    logger.info("report: %s", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
