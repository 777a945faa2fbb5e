"""benchmark/report.py on a small fixture: run selection, computed findings, files written, CLI."""
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
    _run(results, "Fast 0.2")["psnr_mean"] = float("nan")
    _run(results, "Fast 0.1")["psnr_mean"] = None
    assert report.best_speedups(results, 25.0)["Fast"]["label"] == "Fast 0.05"


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
    assert "does not dominate" in sentence and "Tea 0.6" in sentence and "1 of 7" in sentence

    better = copy.deepcopy(results)
    _run(better, "Fb 0.1")["psnr_mean"] = 27.5  # above Fast 0.2's 27 dB, but Fast 0.1 (2.0x, 32 dB) covers 1.6x
    assert report.undominated_runs(better) == []
    _run(better, "Fb 0.1")["speedup"] = 2.2  # now only Fast 0.2 is as fast, and it has less PSNR
    assert [r["label"] for r in report.undominated_runs(better)] == ["Fb 0.1"]
    assert "does not dominate" in _dominance_sentence(better)


def test_leader_sentences_follow_the_numbers(results):
    text = " ".join(report.findings(results))
    assert "Fast leads at PSNR ≥ 30 dB with 2.00×; the runner-up is Fb with 1.30×." in text
    assert "Fast leads at PSNR ≥ 25 dB with 2.50×; the runner-up is Fb with 1.60×." in text
    assert "Tea and diffusers-FBCache have no run at that quality." in text

    _run(results, "diffusers-FBCache 0.08").update(speedup=2.6, psnr_mean=26.0)
    text = " ".join(report.findings(results))
    assert "diffusers-FBCache leads at PSNR ≥ 25 dB with 2.60×; the runner-up is Fast with 2.50×." in text
    assert "Fast leads at PSNR ≥ 30 dB" in text

    for run in results["runs"]:
        run["psnr_mean"] = 10.0
    text = " ".join(report.findings(results))
    assert "No method reaches PSNR ≥ 30 dB" in text and "No method reaches PSNR ≥ 25 dB" in text


def test_overhead_sentence_and_empty_overhead(results):
    assert any("at most 4.5% (Fast) and at least 0.0% (Fb)" in s for s in report.findings(results))
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
        run["ssim_mean"] = None
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
    assert "| Fast | 2.00× (thr 0.1, 32.00 dB) | 2.50× (thr 0.2, 27.00 dB) |" in rows
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
