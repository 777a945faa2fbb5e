"""Report for a cache benchmark run: comparison grid, charts, HTML page and a performance page.

    python benchmark/report.py benchmark_results/results.json
    python benchmark/report.py results.json --output_dir report/ --performance_md docs/performance/pixart.md

Input is the ``results.json`` written by ``benchmark/cache_execute.py`` (image paths inside it are
relative to the folder holding it). Every sentence under "Findings" is computed from the numbers
in that file; nothing in the report is a fixed conclusion. PSNR may be ``Infinity`` (identical
images): tables print "∞" and plots cap it at ``PSNR_PLOT_CAP`` dB.
"""
from __future__ import annotations

import argparse
import html
import json
import math
import sys
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

PSNR_PLOT_CAP = 100.0
"""PSNR values above this (including ∞) are drawn at this height."""
GRID_FLOOR_DB = 25.0
"""A method's run shown in the grid and per-method charts: its fastest run at PSNR ≥ this."""
FINDING_FLOORS_DB = (30.0, 25.0)
"""PSNR floors at which the best speed-ups are tabulated and compared."""
REFERENCE_METHOD = "Fast"
"""The method whose speed–quality curve is tested for dominance over all the others."""

GRID_NAME = "comparison_grid.png"
CHARTS = {
    "latency_speedup.png": "Latency and speed-up of each method's fastest run at PSNR ≥ 25 dB",
    "speed_quality.png": "Speed-up vs PSNR for every threshold (one line per method)",
    "hit_ratio_per_step.png": "Fraction of blocks reused per step (chosen run per method)",
    "hit_ratio_per_block.png": "Fraction of steps each block was reused (chosen run per method)",
    "ssim_speedup.png": "SSIM vs speed-up for every threshold (one line per method)",
}
_MISSING = "—"


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


def _psnr_key(run: dict) -> float:
    """``psnr_mean`` for comparisons: missing counts as -inf."""
    v = _num(run.get("psnr_mean"))
    return -math.inf if v is None else v


def _mean(values: Optional[Iterable[Any]]) -> Optional[float]:
    nums = [v for v in (_num(x) for x in (values or [])) if v is not None]
    return sum(nums) / len(nums) if nums else None


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
    """Per method, the run with the highest speed-up whose ``psnr_mean`` ≥ ``psnr_floor`` (None if none)."""
    best: dict[str, dict | None] = {}
    for method in methods(results):
        eligible = [
            r for r in runs_of(results, method)
            if _num(r.get("speedup")) is not None and _psnr_key(r) >= psnr_floor
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
            chosen[method] = (max(runs, key=_psnr_key), False)
    return chosen


def undominated_runs(results: dict, method: str = REFERENCE_METHOD) -> list[dict]:
    """Runs of other methods that no run of ``method`` matches in both speed-up and PSNR.

    ``method``'s curve dominates when this is empty: for every other run there is a ``method`` run
    with ≥ speed-up and ≥ PSNR. Runs without a speed-up or PSNR are left out on both sides.
    """
    def point(run: dict) -> Optional[tuple[float, float]]:
        s, p = _num(run.get("speedup")), _num(run.get("psnr_mean"))
        return None if s is None or p is None else (s, p)

    own = [p for p in (point(r) for r in runs_of(results, method)) if p is not None]
    others = [r for r in results.get("runs", []) if r["method"] != method and point(r) is not None]
    return [r for r in others if not any(s >= point(r)[0] and p >= point(r)[1] for s, p in own)]


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


def fmt_setting(run: dict) -> str:
    """A run's knob values: the threshold, plus the cap on consecutive cached steps when set."""
    cap = _num(run.get("max_cached_steps"))
    text = fmt_threshold(run.get("threshold"))
    return text + (f", cap {cap:g}" if cap is not None and cap >= 0 else "")


def fmt_speedup(value: Any) -> str:
    return _fmt(value, ".2f", "×")


def _plot_psnr(value: Any) -> Optional[float]:
    v = _num(value)
    return None if v is None else min(v, PSNR_PLOT_CAP)


def _run_rel_l2(run: dict) -> Optional[float]:
    return _num(run.get("rel_l2_mean")) if "rel_l2_mean" in run else _mean(run.get("rel_l2_latents"))


def _run_row(run: dict) -> list[str]:
    """One run as table cells (label, method, kind, threshold, latency, speed-up, quality, cache stats)."""
    lpips = _num(run.get("lpips_mean"))
    return [
        str(run.get("label", run["method"])), str(run["method"]), str(run.get("kind", "xfuser")),
        fmt_threshold(run.get("threshold")), _fmt(run.get("latency_s"), ".3f", " s"), fmt_speedup(run.get("speedup")),
        fmt_psnr(run.get("psnr_mean")), _fmt(run.get("ssim_mean"), ".4f"), _fmt(_run_rel_l2(run), ".4f"),
        "skipped" if lpips is None else f"{lpips:.4f}", _fmt(run.get("hit_ratio"), ".2f"),
        _fmt(run.get("compute_fraction"), ".2f"), _fmt_mib(run.get("cache_state_bytes")), _fmt_mib(run.get("peak_memory_bytes")),
    ]


def _fmt_mib(value: Any) -> str:
    value = _num(value)
    return _MISSING if value is None else f"{value / 2**20:.1f}"


RUN_COLUMNS = ["Run", "Method", "Kind", "Threshold", "Latency", "Speed-up", "PSNR (dB)", "SSIM", "Rel. L2 (latents)",
               "LPIPS", "Hit ratio", "Compute fraction", "Cache state (MiB)", "Peak memory (MiB)"]


def _best_cell(run: Optional[dict]) -> str:
    if run is None:
        return _MISSING
    return f"{fmt_speedup(run.get('speedup'))} (thr {fmt_setting(run)}, {fmt_psnr(run.get('psnr_mean'))} dB)"


def _best_rows(results: dict) -> list[list[str]]:
    bests = [best_speedups(results, floor) for floor in FINDING_FLOORS_DB]
    return [[m] + [_best_cell(b[m]) for b in bests] for m in methods(results)]


def _best_columns() -> list[str]:
    return ["Method"] + [f"Best speed-up at PSNR ≥ {floor:g} dB" for floor in FINDING_FLOORS_DB]


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def findings(results: dict) -> list[str]:
    """Plain-text sentences, every one computed from ``results``."""
    out: list[str] = []
    baseline = results.get("baseline") or {}
    n_cases = len(results.get("cases", []))
    if _num(baseline.get("latency_s")) is not None:
        out.append(f"The uncached baseline's median latency is {baseline['latency_s']:.3f} s over {n_cases} case(s).")
    all_methods = methods(results)
    if not all_methods:
        out.append("The results hold no cached runs.")
        return out

    for floor in FINDING_FLOORS_DB:
        best = best_speedups(results, floor)
        reached = {m: r for m, r in best.items() if r is not None}
        missing = [m for m, r in best.items() if r is None]
        if not reached:
            out.append(f"No method reaches PSNR ≥ {floor:g} dB on these cases.")
            continue
        parts = [f"{m} {fmt_speedup(r['speedup'])} (threshold {fmt_setting(r)}, "
                 f"{fmt_psnr(r['psnr_mean'])} dB)" for m, r in reached.items()]
        sentence = f"Best speed-up at PSNR ≥ {floor:g} dB: {_join(parts)}."
        if missing:
            sentence += f" {_join(missing)} {'has' if len(missing) == 1 else 'have'} no run at that quality."
        out.append(sentence)
        ranked = sorted(reached.items(), key=lambda kv: -_num(kv[1]["speedup"]))
        top = _num(ranked[0][1]["speedup"])
        leaders = [m for m, r in ranked if _num(r["speedup"]) == top]
        rest = [(m, r) for m, r in ranked if m not in leaders]
        if len(leaders) > 1:
            lead = f"{_join(leaders)} tie for the lead at PSNR ≥ {floor:g} dB with {fmt_speedup(top)}"
        else:
            lead = f"{leaders[0]} leads at PSNR ≥ {floor:g} dB with {fmt_speedup(top)}"
        if rest:
            lead += f"; the runner-up is {rest[0][0]} with {fmt_speedup(rest[0][1]['speedup'])}"
        out.append(lead + ".")

    ref, others = REFERENCE_METHOD, [m for m in all_methods if m != REFERENCE_METHOD]
    n_other = sum(1 for r in results.get("runs", []) if r["method"] != ref
                  and _num(r.get("speedup")) is not None and _num(r.get("psnr_mean")) is not None)
    if ref not in all_methods:
        out.append(f"There are no {ref} runs, so its speed–quality dominance is not assessed.")
    elif not others or n_other == 0:
        out.append(f"Only {ref} has runs with speed-up and PSNR, so there is nothing to compare its curve against.")
    else:
        beaten = undominated_runs(results, ref)
        if not beaten:
            out.append(f"{ref}'s speed–quality curve dominates the others: each of the {n_other} runs of "
                       f"{_join(others)} is matched or beaten in both speed-up and PSNR by some {ref} run.")
        else:
            examples = "; ".join(f"{r.get('label', r['method'])}: {fmt_speedup(r['speedup'])} at "
                                 f"{fmt_psnr(r['psnr_mean'])} dB" for r in beaten[:3])
            out.append(f"{ref}'s speed–quality curve does not dominate the others: {len(beaten)} of {n_other} "
                       f"other runs have no {ref} run with both a higher-or-equal speed-up and PSNR ({examples}).")

    chosen = chosen_runs(results)
    hits = [f"{m} {r['hit_ratio']:.2f} (threshold {fmt_setting(r)})" for m, (r, _) in chosen.items()
            if _num(r.get("hit_ratio")) is not None]
    if hits:
        out.append(f"Cache hit ratio of each method's chosen run: {_join(hits)}.")
    below = [m for m, (_, ok) in chosen.items() if not ok]
    if below:
        out.append(f"{_join(below)} {'has' if len(below) == 1 else 'have'} no run at PSNR ≥ {GRID_FLOOR_DB:g} dB; "
                   "the grid and charts show the lowest threshold instead.")

    overhead = {m: _num(v) for m, v in (results.get("overhead") or {}).items() if _num(v) is not None}
    if overhead:
        hi = max(overhead, key=overhead.get)
        lo = min(overhead, key=overhead.get)
        sentence = f"With caching forced off, the bookkeeping slows the pipeline by at most {overhead[hi]:.1%} ({hi})"
        out.append(sentence + (f" and at least {overhead[lo]:.1%} ({lo})." if lo != hi else "."))
    else:
        out.append("The caching overhead (caching forced off) was not measured.")

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
    A method's column shows its fastest run at PSNR ≥ 25 dB, or its lowest threshold if none.
    """
    out_dir = Path(out_dir)
    root = Path(image_root) if image_root is not None else out_dir
    size = (int(results.get("height") or 64), int(results.get("width") or 64))
    cases = results.get("cases") or [["", None]] * len(results.get("baseline", {}).get("images", []))
    chosen = chosen_runs(results)
    columns: list[tuple[str, list, Optional[dict], bool]] = [("Uncached", results.get("baseline", {}).get("images", []), None, True)]
    columns += [(m, r.get("images") or [], r, ok) for m, (r, ok) in chosen.items()]
    n_rows, n_cols = max(1, len(cases)), len(columns)
    fig = Figure(figsize=(2.3 * n_cols, 2.5 * n_rows + 0.3), dpi=100, layout="constrained")
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
                         f"{fmt_speedup(run.get('speedup'))}, {fmt_psnr(case_psnr)} dB")
            ax.set_title(title, fontsize=8)
            if col == 0 and row < len(cases):
                prompt, seed = (list(cases[row]) + [None, None])[:2]
                text = str(prompt) if len(str(prompt)) <= 28 else str(prompt)[:27] + "…"
                ax.set_ylabel(f"{text}\nseed {seed}", fontsize=7)
    return _save(fig, out_dir / GRID_NAME)


def _method_curve(results: dict, method: str, y_key: str, cap: bool) -> tuple[list[float], list[float]]:
    points = []
    for run in runs_of(results, method):
        x = _num(run.get("speedup"))
        y = _plot_psnr(run.get(y_key)) if cap else _num(run.get(y_key))
        if x is not None and y is not None:
            points.append((x, y))
    points.sort()
    return [p[0] for p in points], [p[1] for p in points]


def _chart_latency(results: dict, path: Path) -> Optional[Path]:
    best = best_speedups(results, GRID_FLOOR_DB)
    names, latencies, speedups = [], [], []
    base = _num((results.get("baseline") or {}).get("latency_s"))
    if base is not None:
        names.append("Uncached")
        latencies.append(base)
        speedups.append(1.0)
    for method, run in best.items():
        if run is not None and _num(run.get("latency_s")) is not None:
            names.append(f"{method}\nthr {fmt_setting(run)}")
            latencies.append(_num(run["latency_s"]))
            speedups.append(_num(run.get("speedup")) or 0.0)
    if len(names) == 0:
        return None
    fig = Figure(figsize=(max(6.0, 1.6 * len(names)), 4.0), dpi=100, layout="constrained")
    ax_lat, ax_speed = fig.subplots(1, 2)
    x = np.arange(len(names))
    ax_lat.bar_label(ax_lat.bar(x, latencies, color="tab:blue"), fmt="%.3f", fontsize=7)
    ax_lat.set_ylabel("latency (s)")
    ax_speed.bar_label(ax_speed.bar(x, speedups, color="tab:green"), fmt="%.2f×", fontsize=7)
    ax_speed.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax_speed.set_ylabel("speed-up (×)")
    for ax in (ax_lat, ax_speed):
        ax.set_xticks(x, names, fontsize=7, rotation=30, ha="right")
        ax.margins(y=0.12)
    fig.suptitle(f"Fastest run per method at PSNR ≥ {GRID_FLOOR_DB:g} dB")
    return _save(fig, path)


def _chart_curves(results: dict, path: Path, y_key: str, ylabel: str, psnr: bool) -> Optional[Path]:
    curves = {m: _method_curve(results, m, y_key, cap=psnr) for m in methods(results)}
    curves = {m: c for m, c in curves.items() if c[0]}
    if not curves:
        return None
    kinds = {r["method"]: r.get("kind", "xfuser") for r in results.get("runs", [])}
    fig = Figure(figsize=(6.5, 4.5), dpi=100, layout="constrained")
    ax = fig.subplots()
    for method, (xs, ys) in curves.items():
        ax.plot(xs, ys, marker="o", ls="--" if kinds.get(method) == "peer" else "-", label=method)
    if psnr:
        for floor in sorted(FINDING_FLOORS_DB):
            ax.axhline(floor, color="grey", lw=0.8, ls=":")
            ax.text(0.01, floor, f"{floor:g} dB", transform=ax.get_yaxis_transform(), va="bottom", fontsize=7, color="grey")
        if any(y >= PSNR_PLOT_CAP for _, ys in curves.values() for y in ys):
            ylabel += f" (∞ drawn at {PSNR_PLOT_CAP:g})"
    ax.set_xlabel("speed-up (×)")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _per_step_reuse(stats: dict) -> list[tuple[int, float]]:
    out = []
    for i, entry in enumerate(stats.get("per_step") or []):
        actions = str(entry.get("actions") or "")
        if actions:
            out.append((int(entry.get("step", i)), sum(a != "C" for a in actions) / len(actions)))
    return out


def _per_block_reuse(stats: dict) -> list[tuple[int, float]]:
    steps = _num(stats.get("num_steps"))
    if not steps:
        return []
    return [(int(b.get("block", i)), 1.0 - (_num(b.get("computed")) or 0.0) / steps)
            for i, b in enumerate(stats.get("per_block") or [])]


def _xfuser_stats(results: dict) -> dict[str, tuple[dict, dict]]:
    kinds = {r["method"]: r.get("kind", "xfuser") for r in results.get("runs", [])}
    return {m: (r, r["stats"]) for m, (r, _) in chosen_runs(results).items()
            if kinds.get(m) != "peer" and isinstance(r.get("stats"), dict)}


def _chart_per_step(results: dict, path: Path) -> Optional[Path]:
    series = {m: (r, _per_step_reuse(s)) for m, (r, s) in _xfuser_stats(results).items()}
    series = {m: v for m, v in series.items() if v[1]}
    if not series:
        return None
    fig = Figure(figsize=(6.5, 4.0), dpi=100, layout="constrained")
    ax = fig.subplots()
    for method, (run, points) in series.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=4, alpha=0.8,
                label=f"{method} thr {fmt_setting(run)}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("denoising step")
    ax.set_ylabel("fraction of blocks not computed")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _chart_per_block(results: dict, path: Path) -> Optional[Path]:
    series = {m: (r, _per_block_reuse(s)) for m, (r, s) in _xfuser_stats(results).items()}
    series = {m: v for m, v in series.items() if v[1]}
    if not series:
        return None
    fig = Figure(figsize=(6.5, 4.0), dpi=100, layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(series)
    for i, (method, (run, points)) in enumerate(series.items()):
        ax.bar(np.array([p[0] for p in points]) + (i - (len(series) - 1) / 2) * width, [p[1] for p in points],
               width=width, label=f"{method} thr {fmt_setting(run)}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("block")
    ax.set_ylabel("1 − computed / steps")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    return _save(fig, path)


def make_charts(results: dict, out_dir: str | Path) -> list[Path]:
    """Write the PNG charts whose data is present (names in ``CHARTS``); return their paths."""
    out_dir = Path(out_dir)
    makers = {
        "latency_speedup.png": _chart_latency,
        "speed_quality.png": lambda r, p: _chart_curves(r, p, "psnr_mean", "PSNR (dB)", psnr=True),
        "hit_ratio_per_step.png": _chart_per_step,
        "hit_ratio_per_block.png": _chart_per_block,
        "ssim_speedup.png": lambda r, p: _chart_curves(r, p, "ssim_mean", "SSIM", psnr=False),
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


def _header_items(results: dict) -> list[tuple[str, str]]:
    return [
        ("Model", f"{results.get('model', _MISSING)} ({results.get('model_type', _MISSING)})"),
        ("Date", str(results.get("date", _MISSING))),
        ("Machine", str(results.get("machine", _MISSING))),
        ("Command", str(results.get("command", _MISSING))),
        ("Steps", str(results.get("num_inference_steps", _MISSING))),
        ("Size", f"{results.get('height', '?')}×{results.get('width', '?')}"),
        ("Cases", str(len(results.get("cases", [])))),
    ]


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
                     f"method's fastest run at PSNR ≥ {GRID_FLOOR_DB:g} dB (or its lowest threshold).</figcaption></figure>")
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
        parts.append(_html_table(["Method", "Slowdown vs uncached"], [[m, _fmt(v, ".1%")] for m, v in overhead.items()]))
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
