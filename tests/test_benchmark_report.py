"""benchmark/report.py on a small fixture: run selection (worst-image floors), computed findings
and their timing-noise flags, chart data, files written, CLI; and the hit ratio it prints."""
from __future__ import annotations

import copy
import importlib.util
import math
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "fixtures" / "benchmark_results.json"


def _import_report():
    spec = importlib.util.spec_from_file_location("benchmark_report", ROOT / "benchmark" / "report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


report = _import_report()
RUN_COL = {name: i for i, name in enumerate(report.RUN_COLUMNS)}


def _image_paths(results: dict) -> list[str]:
    paths = list(results["baseline"]["images"])
    for run in results["runs"]:
        paths += run["images"]
    return paths


def _write_images(results: dict, folder: Path) -> None:
    """A small solid-colour image per path; runs get noise added so cells differ."""
    rng = np.random.default_rng(0)
    h, w = results["height"], results["width"]
    for i, rel in enumerate(_image_paths(results)):
        pixels = np.full((h, w, 3), (40 * i) % 256, dtype=np.uint8)
        if not rel.startswith("None_"):
            pixels = np.clip(pixels + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / rel)


@pytest.fixture()
def results() -> dict:
    return report.load_results(FIXTURE)


@pytest.fixture()
def results_dir(tmp_path: Path, results: dict) -> Path:
    """A benchmark output folder: results.json plus every image it names."""
    folder = tmp_path / "bench"
    folder.mkdir()
    (folder / "results.json").write_text(FIXTURE.read_text())
    _write_images(results, folder)
    return folder


def _run(results: dict, label: str) -> dict:
    return next(r for r in results["runs"] if r["label"] == label)


def _set_speedup(run: dict, speedup: float) -> None:
    """A new speed-up with the per-repeat cached timings scaled to match (same relative noise)."""
    scale = run["speedup"] / speedup
    run["latency_runs_s"] = [[t * scale for t in case] for case in run["latency_runs_s"]]
    run["latency_s"] *= scale
    run["speedup"] = speedup


def _one_repeat(results: dict) -> dict:
    """The fixture as a run with ``--repeats 1`` would have written it."""
    one = copy.deepcopy(results)
    for run in one["runs"] + list(one["overhead_runs"].values()):
        for key in ("latency_runs_s", "baseline_runs_s"):
            run[key] = [case[:1] for case in run[key]]
    return one


def _assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.refs += [v for k, v in attrs if k in ("src", "href") and v is not None]


# ------------------------------------------------------------------------------------ selection


def test_best_speedups_picks_fastest_run_above_floor(results):
    at30 = report.best_speedups(results, 30.0)
    assert list(at30) == ["Fast", "Fb", "Tea", "diffusers-FBCache"]  # xfuser methods, then peers
    assert at30["Fast"]["label"] == "Fast 0.1"  # 2.00x at 32 dB beats the ∞-dB run's 1.50x
    assert at30["Fb"]["label"] == "Fb 0.05"  # 30.5 dB: just above the floor
    assert at30["Tea"] is None and at30["diffusers-FBCache"] is None

    at25 = report.best_speedups(results, 25.0)
    assert at25["Fast"]["label"] == "Fast 0.2"
    assert at25["Fb"]["label"] == "Fb 0.1"
    assert at25["Tea"] is None  # best Tea is 24.5 dB
    assert at25["diffusers-FBCache"]["label"] == "diffusers-FBCache 0.08"


def test_best_speedups_infinite_psnr_qualifies_at_any_floor(results):
    best = report.best_speedups(results, 60.0)
    assert best["Fast"]["label"] == "Fast 0.05"
    assert all(best[m] is None for m in ("Fb", "Tea", "diffusers-FBCache"))


def test_best_speedups_skips_runs_without_psnr(results):
    _run(results, "Fast 0.2")["psnr"] = [float("nan"), 28.0]  # one image unscored: its worst is unknown
    _run(results, "Fast 0.1").update(psnr=None, psnr_mean=None)
    assert report.worst(_run(results, "Fast 0.2")) is None
    assert report.best_speedups(results, 25.0)["Fast"]["label"] == "Fast 0.2 cap 2"
    _run(results, "Fast 0.2 cap 2")["psnr"] = None
    assert report.best_speedups(results, 25.0)["Fast"]["label"] == "Fast 0.1 cap 2"


def test_quality_floor_applies_to_the_worst_image(results):
    """Fb 0.15 has a 30 dB mean (24 and 36 dB images): by its mean it would be Fb's best run at
    both floors, by its worst image it meets neither."""
    fb = _run(results, "Fb 0.15")
    assert fb["psnr_mean"] >= 30.0 and report.worst(fb) == 24.0
    by_mean = max((r for r in report.runs_of(results, "Fb") if r["psnr_mean"] >= 25.0), key=lambda r: r["speedup"])
    assert by_mean is fb  # the fixture's mean and worst disagree
    assert report.best_speedups(results, 30.0)["Fb"]["label"] == "Fb 0.05"
    assert report.best_speedups(results, 25.0)["Fb"]["label"] == "Fb 0.1"
    cell = report._best_rows(results)[1][2]  # Fb at 25 dB: the worst image, with the mean beside it
    assert "worst 25.00 dB, mean 26.00 dB" in cell and "Fb 0.15" not in cell
    fb["psnr"] = [25.5, 34.5]  # now every image clears 25 dB
    assert report.best_speedups(results, 25.0)["Fb"]["label"] == "Fb 0.15"


def test_chosen_run_falls_back_to_lowest_threshold(results):
    chosen = report.chosen_runs(results)
    assert chosen["Fast"][0]["label"] == "Fast 0.2" and chosen["Fast"][1]
    assert chosen["Tea"][0]["label"] == "Tea 0.1" and not chosen["Tea"][1]


# ------------------------------------------------------------------------------------- findings


def _dominance_sentence(results: dict) -> str:
    return next(s for s in report.findings(results) if "speed–quality curve" in s)


def test_dominance_is_computed_from_the_numbers(results):
    assert report.undominated_runs(results) == []
    assert "does not dominate" not in _dominance_sentence(results)
    assert "dominates the others" in _dominance_sentence(results)

    faster = copy.deepcopy(results)
    _run(faster, "Tea 0.6")["speedup"] = 3.0  # faster than every Fast run
    assert [r["label"] for r in report.undominated_runs(faster)] == ["Tea 0.6"]
    sentence = _dominance_sentence(faster)
    assert "does not dominate" in sentence and "Tea 0.6" in sentence and "1 of 8" in sentence

    better = copy.deepcopy(results)
    _run(better, "Fb 0.1")["psnr"] = [27.5, 28.0]  # above Fast 0.2's 26 dB, but Fast 0.1 (2.0x, 31 dB) covers 1.6x
    assert report.undominated_runs(better) == []
    _run(better, "Fb 0.1")["speedup"] = 2.2  # now only Fast 0.2 is as fast, and its worst image is worse
    assert [r["label"] for r in report.undominated_runs(better)] == ["Fb 0.1"]
    assert "does not dominate" in _dominance_sentence(better)


def test_leader_sentences_follow_the_numbers(results):
    text = " ".join(report.findings(results))
    assert "Fast leads at PSNR ≥ 30 dB with 2.00×; the runner-up is Fb with 1.30×." in text
    assert "Fast leads at PSNR ≥ 25 dB with 2.50×; the runner-up is Fb with 1.60×." in text
    assert "Tea and diffusers-FBCache have no run at that quality." in text

    peer = _run(results, "diffusers-FBCache 0.08")
    peer["psnr"] = [26.0, 26.0]
    _set_speedup(peer, 3.5)
    text = " ".join(report.findings(results))
    assert "diffusers-FBCache leads at PSNR ≥ 25 dB with 3.50×; the runner-up is Fast with 2.50×." in text
    assert "Fast leads at PSNR ≥ 30 dB" in text

    for run in results["runs"]:
        run["psnr"] = [10.0, 40.0]  # a 25 dB mean, but not every image at either floor
    text = " ".join(report.findings(results))
    assert "No method reaches PSNR ≥ 30 dB" in text and "No method reaches PSNR ≥ 25 dB" in text


def test_a_lead_inside_the_runner_ups_spread_is_not_claimed(results):
    peer = _run(results, "diffusers-FBCache 0.08")
    peer["psnr"] = [26.0, 26.0]
    _set_speedup(peer, 2.55)  # paired 2.45x-2.55x against Fast 0.2's 2.40x-2.50x: they overlap
    assert report.clearly_faster(peer, _run(results, "Fast 0.2")) is False
    text = " ".join(report.findings(results))
    assert "diffusers-FBCache leads" not in text
    assert ("diffusers-FBCache has the highest speed-up at PSNR ≥ 25 dB (2.55×; runner-up Fast with 2.50×), "
            "but their paired spreads overlap: no clear leader.") in text


# --------------------------------------------------------------------------------- timing noise


def test_speedup_spread_is_over_the_paired_repeats(results):
    spread = report.speedup_spread(_run(results, "Fast 0.1"))
    run = _run(results, "Fast 0.1")
    ratios = [b / c for base, cached in zip(run["baseline_runs_s"], run["latency_runs_s"]) for b, c in zip(base, cached)]
    assert len(ratios) == 6 and spread.repeats == 3  # 2 cases x 3 repeats
    assert (spread.low, spread.high) == (min(ratios), max(ratios)) and spread.low < spread.median < spread.high
    assert report.timing_verdict(spread) == "outside noise"
    assert report.speedup_spread({"latency_s": 1.0, "speedup": 2.0}) is None  # older files: no per-repeat timings


def test_a_speedup_whose_spread_includes_one_is_flagged(results):
    tea = _run(results, "Tea 0.1")  # 1.20x, paired 0.86x-1.38x
    assert report.timing_verdict(report.speedup_spread(tea)) == "within noise"
    text = " ".join(report.findings(results))
    assert "1 of 13 configurations have a paired speed-up spread that includes 1.0×" in text and "(Tea 0.1)" in text
    assert "; within noise" in report._run_row(tea)[RUN_COL["Paired speed-up spread"]]
    assert "; within noise" not in report._run_row(_run(results, "Tea 0.3"))[RUN_COL["Paired speed-up spread"]]
    # a best-at-floor claim carries the flag too
    _run(results, "Tea 0.6")["psnr"] = [35.0, 35.0]  # Tea's best run at 30 dB now
    claim = next(s for s in report.findings(results) if s.startswith("Best speed-up at PSNR ≥ 30"))
    assert "Tea 2.00× [paired 1.92× to 2.00× (median 1.96×, 3 repeats)] (threshold 0.6" in claim
    _run(results, "Tea 0.6")["latency_runs_s"][0][2] = 1.3  # one repeat slower than its uncached pair (1.26 s)
    claim = next(s for s in report.findings(results) if s.startswith("Best speed-up at PSNR ≥ 30"))
    assert "Tea 2.00× [paired 0.97× to 2.00× (median 1.94×, 3 repeats); within noise] (threshold 0.6" in claim


def test_an_overhead_smaller_than_its_noise_is_flagged(results):
    text = " ".join(report.findings(results))
    assert "measurably changes the latency: Fast 4.5% (paired +3.0% to +6.0% (median +4.5%, 3 repeats))." in text
    assert ("Smaller than its noise, so not a finding: Fb 0.0% (paired -2.0% to +2.0% (median +0.0%, 3 repeats)) "
            "and Tea 3.4% (paired -1.0% to +8.0%") in text
    rows = {row[0]: row for row in report._overhead_rows(results)}
    assert rows["Fast"][3] == "outside noise" and rows["Fb"][3] == rows["Tea"][3] == "within noise"
    timings = results["overhead_runs"]["Fast"]["latency_runs_s"]
    timings[0][1] = 1.0  # one forced-off repeat faster than its uncached pair (1.23 s)
    text = " ".join(report.findings(results))
    assert "measurably" not in text and "no bookkeeping overhead stands out of the timing noise: Fast 4.5%" in text


def test_one_repeat_says_no_spread_is_available(results):
    one = _one_repeat(results)
    assert all(not report.speedup_spread(r).available for r in one["runs"])
    text = " ".join(report.findings(one))
    assert "no spread is available, so no speed-up, ranking or overhead below is established" in text
    assert " leads at " not in text  # no ranking claimed without a spread
    assert "Fast has the highest speed-up at PSNR ≥ 30 dB (2.00×; runner-up Fb with 1.30×), but without a spread" in text
    assert "no spread is available, so it is not established" in text and "measurably" not in text
    assert "2.00× [no spread (1 repeat)]" in report._best_rows(one)[0][1]


def test_an_incomplete_run_says_so(results):
    results["progress"] = {"finished": 5, "total": 14, "complete": False}
    assert report.findings(results)[0].startswith("This run is incomplete: 5 of 14 configurations finished")
    assert ("Finished", "5 of 14 configurations (incomplete)") in report._header_items(results)


# ---------------------------------------------------------------------------------- chart data


def test_speed_quality_lines_are_one_per_method_and_cap(results):
    groups = report.series(results)
    assert list(groups) == [("Fast", -1), ("Fast", 2), ("Fb", -1), ("Tea", -1), ("diffusers-FBCache", -1)]
    assert [r["label"] for r in groups[("Fast", 2)]] == ["Fast 0.1 cap 2", "Fast 0.2 cap 2"]
    for (method, cap), runs in groups.items():
        assert {r["method"] for r in runs} == {method}
        assert {max(r.get("max_cached_steps", -1), -1) for r in runs} == {cap}
        thresholds = [r["threshold"] for r in runs]
        assert thresholds == sorted(thresholds)


def test_latency_and_speedup_bars_share_each_runs_own_baseline(results):
    _run(results, "Fb 0.1").update(baseline_latency_s=1.5, latency_s=1.5 / 1.6)  # a slower moment of the machine
    bars = report.latency_bars(results)
    assert [m for m, *_ in bars] == ["Fast", "Fb", "diffusers-FBCache"]  # no shared "Uncached" bar
    for _, run, base, cached in bars:
        assert base == run["baseline_latency_s"] and cached == run["latency_s"]
        assert base / cached == pytest.approx(run["speedup"])
    assert next(b for m, _, b, _ in bars if m == "Fb") == 1.5
    assert report._run_row(_run(results, "Fb 0.1"))[RUN_COL["Uncached (paired)"]] == "1.500 s"


# ------------------------------------------------------------------------------------ hit ratio


def test_hit_ratio_counts_only_fully_skipped_blocks():
    """Token reduction (``P``) computes a block for some tokens: it is not a hit. The hit ratio can
    then never exceed the skipped fraction of the work."""
    from xfuser.model_executor.cache.stats import CacheStatistics

    stats = CacheStatistics("Fast", 4, [1.0, 1.0, 1.0, 3.0])
    for step, actions in enumerate(["CCCC", "PPPP", "PPRP", "RRRR", "ACPC"]):
        stats.begin_step(step, None)
        for block, action in enumerate(actions):
            stats.record(block, action, 0.5 if action == "P" else 1.0)
    summary = stats.summary()
    assert summary["hit_ratio"] == 6 / 20 and summary["partial_ratio"] == 8 / 20
    assert summary["skipped_fraction"] == pytest.approx((6 + 8 * 0.5) / 20)
    assert summary["hit_ratio"] <= summary["skipped_fraction"]
    assert summary["hit_ratio"] + summary["partial_ratio"] <= 1.0
    old = sum(a != "C" for s in summary["per_step"] for a in s["actions"]) / 20  # P counted as a hit
    assert old > summary["skipped_fraction"]  # the misleading figure the old definition gave
    assert [b["partial"] for b in summary["per_block"]] == [2, 2, 2, 2]

    merged = CacheStatistics.merge_patches([stats, stats]).summary()  # PipeFusion: per-patch records
    assert merged["hit_ratio"] == summary["hit_ratio"] and merged["partial_ratio"] == summary["partial_ratio"]


def test_reuse_charts_keep_partial_blocks_apart(results):
    stats = _run(results, "Fast 0.2")["stats"]  # block 0 computed for a token subset at steps 1 and 3
    assert report.per_step_fractions(stats)[1] == (1, 0.75, 0.25)
    assert report.per_block_fractions(stats)[0] == (0, 0.25, 0.5)
    run = _run(results, "Fast 0.2")
    assert run["hit_ratio"] + run["partial_ratio"] <= 1.0 and run["hit_ratio"] <= run["stats"]["skipped_fraction"]
    row = report._run_row(run)
    assert row[RUN_COL["Hit ratio (fully skipped)"]] == "0.62" and row[RUN_COL["Partial ratio"]] == "0.12"



def test_overhead_sentence_and_empty_overhead(results):
    assert any("the bookkeeping measurably changes the latency: Fast 4.5% (paired +3.0% to +6.0%" in s
               for s in report.findings(results))
    one = _one_repeat(results)
    assert any("the measured slowdown is at most 4.5% (Fast) and at least 0.0% (Fb), but no spread is available" in s
               for s in report.findings(one))
    results["overhead"] = {}
    assert any("not measured" in s for s in report.findings(results))


# --------------------------------------------------------------------------------------- files


def test_grid_and_charts_are_valid_pngs(results, results_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    grid = report.make_grid(results, out, image_root=results_dir)
    _assert_png(grid)
    with Image.open(grid) as im:  # 2 case rows x (uncached + 4 methods) columns
        assert im.width > im.height
    charts = report.make_charts(results, out)
    assert sorted(p.name for p in charts) == sorted(report.CHARTS)
    for chart in charts:
        _assert_png(chart)


def test_charts_skip_missing_data(results, tmp_path):
    for run in results["runs"]:
        run["stats"] = None
        run["ssim"] = None
    names = {p.name for p in report.make_charts(results, tmp_path)}
    assert names == {"latency_speedup.png", "speed_quality.png"}


def test_empty_results_write_no_chart(tmp_path):
    assert report.make_charts({"runs": [], "baseline": {}}, tmp_path) == []


def test_grid_tolerates_missing_images(results, tmp_path):
    _assert_png(report.make_grid(results, tmp_path))  # no images under tmp_path: placeholders


def test_html_contents_and_links(results, results_dir):
    grid = report.make_grid(results, results_dir)
    charts = report.make_charts(results, results_dir)
    page = report.write_html(results, results_dir, grid=grid, charts=charts)
    text = page.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")

    parser = _Refs()
    parser.feed(text)
    assert "script" not in parser.tags and "link" not in parser.tags  # offline, no external CSS/JS
    assert sorted(parser.refs) == sorted([grid.name] + [c.name for c in charts])
    for ref in parser.refs:
        assert "://" not in ref and not ref.startswith("/")
        assert (results_dir / ref).is_file()

    for run in results["runs"]:
        assert f"<td>{run['label']}</td>" in text
    assert "not installed (pip install cache-dit)" in text and "cache-dit DBCache" in text
    assert "&lt;center&gt; &amp; more" in text and "<center>" not in text  # escaped prompt
    assert "<td>∞</td>" in text and "<td>skipped</td>" in text
    assert "Findings" in text and "dominates the others" in text
    assert "<td>4.5%</td>" in text  # overhead table
    assert "<th>PSNR worst (dB)</th>" in text and "<th>Uncached (paired)</th>" in text and "<th>Partial ratio</th>" in text
    assert "<td>within noise</td>" in text and "includes 1.0×" in text  # the flags reach the page


def test_html_links_only_existing_files(results, tmp_path):
    page = report.write_html(results, tmp_path)  # no grid, no charts written
    parser = _Refs()
    parser.feed(page.read_text(encoding="utf-8"))
    assert parser.refs == []
    report.make_charts(results, tmp_path)
    parser = _Refs()
    parser.feed(report.write_html(results, tmp_path).read_text(encoding="utf-8"))
    assert sorted(parser.refs) == sorted(report.CHARTS)


def test_performance_markdown(results, tmp_path):
    md = report.write_performance_md(results, tmp_path / "docs" / "performance" / "tiny.md")
    text = md.read_text(encoding="utf-8")
    assert "benchmark/report.py" in text.splitlines()[0]
    for needle in ("x86_64, torch threads=2", "2026-11-25", "cache_execute.py --sweep", "tiny-pixart-fixture", "32×32"):
        assert needle in text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    for run in results["runs"]:
        assert any(row.startswith(f"| {run['label']} | {run['method']} |") for row in rows)
    assert ("| Fast | 2.00× [paired 1.92× to 2.00× (median 1.96×, 3 repeats)] (thr 0.1, worst 31.00 dB, mean 32.00 dB) "
            "| 2.50× [paired 2.40× to 2.50× (median 2.45×, 3 repeats)] (thr 0.2, worst 26.00 dB, mean 27.00 dB) |") in rows
    assert any(row.startswith("| Fb | 0.0% | -2.0% to +2.0% (median +0.0%, 3 repeats) | within noise |") for row in rows)
    assert "| Tea | — | — |" in rows
    assert any(row.startswith("| Fast 0.05 |") and "| ∞ |" in row for row in rows)


# ----------------------------------------------------------------------------------------- CLI


def test_main_end_to_end(results_dir, tmp_path):
    out = tmp_path / "report"
    md = tmp_path / "perf.md"
    assert report.main([str(results_dir / "results.json"), "--output_dir", str(out), "--performance_md", str(md)]) == 0
    _assert_png(out / report.GRID_NAME)
    for name in report.CHARTS:
        _assert_png(out / name)
    assert (out / "report.html").is_file() and md.is_file()
    assert not (results_dir / "report.html").exists()


def test_main_defaults_to_json_folder(results_dir):
    assert report.main([str(results_dir / "results.json")]) == 0
    assert (results_dir / "report.html").is_file() and (results_dir / report.GRID_NAME).is_file()


def test_main_missing_file(tmp_path):
    assert report.main([str(tmp_path / "absent.json")]) == 2


def test_script_runs_standalone(results_dir):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmark" / "report.py"), str(results_dir / "results.json")],
                          cwd=results_dir, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "report.html" in proc.stderr  # the final path, via the logger
    assert (results_dir / "results.json").read_text() == FIXTURE.read_text()  # input left untouched


def test_results_are_strict_json_and_the_report_reads_infinity_back():
    """PSNR of identical images is +inf: written as the string "Infinity" (strict JSON that any
    parser reads), NaN as null, and read back by the report as the number."""
    import json

    from xfuser import strict_json

    text = strict_json.dumps({"psnr": [math.inf, 31.5], "worst": -math.inf, "ssim": math.nan})
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict constant {c}")) == {
        "psnr": ["Infinity", 31.5], "worst": "-Infinity", "ssim": None}
    assert [report._num(v) for v in ("Infinity", "-Infinity", None, 31.5, "n/a")] == [math.inf, -math.inf, None, 31.5, None]
    assert report.fmt_psnr("Infinity") == "∞"


def test_infinite_psnr_is_drawn_just_above_the_finite_values():
    assert report.infinity_height([31.0, math.inf, 42.5]) == 47.5
    assert report.infinity_height([math.inf]) == 45.0  # nothing finite: a fixed, labelled height
