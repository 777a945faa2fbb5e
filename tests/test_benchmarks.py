"""The benchmark and example scripts end to end on tiny models, the quality metrics on known
image pairs, and the peers' set-up/tear-down (a peer must leave the pipeline as it found it)."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from xfuser.metrics import LPIPSUnavailable, lpips_scorer, psnr, relative_l2, ssim

ROOT = Path(__file__).resolve().parents[1]


def _strict(path):
    """A results file read as strict JSON (a bare ``Infinity``/``NaN`` fails the test), with the
    strings the benchmarks write for ±inf turned back into floats."""
    def reject(constant):
        raise AssertionError(f"{path} is not strict JSON: it contains {constant}")

    def numbers(obj):
        if isinstance(obj, dict):
            return {k: numbers(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [numbers(v) for v in obj]
        return {"Infinity": math.inf, "-Infinity": -math.inf}.get(obj, obj) if isinstance(obj, str) else obj

    return numbers(json.loads(path.read_text(), parse_constant=reject))


def _load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------ metrics
def test_identical_images_give_infinite_psnr_and_unit_ssim():
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert psnr(img, img.copy()) == math.inf
    assert ssim(img, img.copy()) == pytest.approx(1.0)


def test_known_offset_gives_known_psnr():
    ref = np.full((32, 32, 3), 100, dtype=np.uint8)
    img = np.full((32, 32, 3), 110, dtype=np.uint8)
    assert psnr(img, ref) == pytest.approx(20 * math.log10(255 / 10), abs=1e-6)  # 28.13 dB
    noise = np.random.default_rng(1).normal(0, 0.05, (64, 64, 3))
    noisy = np.clip(0.5 + noise, 0, 1)
    expected = 10 * math.log10(1 / np.mean((noisy - 0.5) ** 2))
    assert psnr(noisy, np.full_like(noisy, 0.5)) == pytest.approx(expected, abs=1e-6)
    assert ssim(noisy, np.full_like(noisy, 0.5)) < 0.9


def test_relative_l2():
    a = torch.ones(4, 4)
    assert relative_l2(a * 1.1, a) == pytest.approx(0.1, rel=1e-5)
    assert relative_l2(a, a) == 0.0


def test_lpips_scores_or_says_why_it_is_skipped():
    try:
        score = lpips_scorer()
    except LPIPSUnavailable as exc:
        assert str(exc).startswith("skipped: no weights")
        return
    img = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert score(img, img) == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------------------ peers
def _tiny_run(pipe, prompt=None):
    from xfuser.testing.tiny_pipelines import tiny_call_kwargs

    kwargs = tiny_call_kwargs("pixart-sigma")
    kwargs["num_inference_steps"] = 6
    if prompt is not None:
        kwargs["prompt"] = prompt
    return pipe(**kwargs).images


@pytest.fixture(scope="module")
def tiny_pixart():
    from xfuser.testing.tiny_pipelines import build_tiny_pipeline

    torch.set_grad_enabled(False)
    pipe = build_tiny_pipeline("pixart-sigma")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_every_peer_changes_the_output_and_leaves_the_pipeline_as_it_was(tiny_pixart):
    peers_module = _load("benchmark/peers.py", "peers")
    pipe = tiny_pixart
    reference = _tiny_run(pipe)
    cls = type(pipe.transformer)
    calibration_prompts = []

    def calibrate(prompt):  # MagCache's calibration run, the way the benchmark runs a case
        calibration_prompts.append(prompt)
        _tiny_run(pipe, prompt)

    # huge threshold: every peer caches
    peers, skipped = peers_module.available_peers(pipe, [5.0], calibrate=calibrate, num_inference_steps=6)
    names = {p.method for p in peers} | {s["name"] for s in skipped}
    assert {"diffusers-FBCache", "diffusers-TaylorSeer", "diffusers-PAB", "diffusers-MagCache"} <= names
    assert {"cache-dit-DBCache", "cache-dit-DBCache-TaylorSeer"} <= names
    assert all(s["reason"] for s in skipped)
    assert "diffusers-MagCache" in {p.method for p in peers}, skipped  # diffusers 0.42 has MagCacheConfig
    for peer in peers:
        peer.enable(pipe)
        try:
            peer.reset(pipe)
            first = _tiny_run(pipe)
            peer.reset(pipe)
            again = _tiny_run(pipe)
        finally:
            peer.disable(pipe)
        assert not torch.equal(first, reference), f"{peer.label} changed nothing: it is not running"
        assert torch.equal(first, again), f"{peer.label}: state leaked between generations"
        assert type(pipe.transformer) is cls
        assert torch.equal(_tiny_run(pipe), reference), f"{peer.label} left hooks behind"
    # MagCache calibrated once for all its peers, on its own prompt (not the evaluated one)
    from xfuser.testing.tiny_pipelines import tiny_call_kwargs

    assert calibration_prompts == [peers_module.MAGCACHE_CALIBRATION_PROMPT]
    bench = _load("benchmark/cache_execute.py", "cache_execute_prompts")
    evaluated = [tiny_call_kwargs("pixart-sigma")["prompt"], *bench.DEFAULT_PROMPTS, *getattr(bench, "HELDOUT_PROMPTS", [])]
    assert calibration_prompts[0] not in evaluated


def test_magcache_calibration_reads_the_ratios_and_checks_the_schedule(tiny_pixart):
    peers_module = _load("benchmark/peers.py", "peers_magcache")
    pipe = tiny_pixart
    reference = _tiny_run(pipe)
    cls = type(pipe.transformer)
    runs = []
    calibration = peers_module.MagCacheCalibration(pipe, lambda prompt: runs.append(_tiny_run(pipe, prompt)), 6)
    ratios = calibration.ratios(pipe)
    assert len(ratios) == 6 and ratios[0] == 1.0 and all(math.isfinite(r) and r > 0 for r in ratios)
    assert calibration.ratios(pipe) == ratios and len(runs) == 1  # kept: no second run
    assert torch.equal(_tiny_run(pipe), reference)  # calibration hooks removed
    # ratios recorded on another schedule than the one run: refused, nothing left behind
    wrong = peers_module.MagCacheCalibration(pipe, lambda prompt: _tiny_run(pipe, prompt), 4)
    with pytest.raises(RuntimeError, match="MagCache"):
        wrong.ratios(pipe)
    assert type(pipe.transformer) is cls
    assert torch.equal(_tiny_run(pipe), reference)


# ------------------------------------------------------------------------------ scripts
def _log_lines(name: str):
    """A list that collects the messages of logger ``name`` (the xfuser root does not propagate)."""
    import logging

    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger(name).addHandler(handler)
    return lines, lambda: logging.getLogger(name).removeHandler(handler)


def test_cache_execute_end_to_end_with_peers_and_report(tmp_path):
    import statistics

    bench = _load("benchmark/cache_execute.py", "cache_execute")
    out = tmp_path / "bench"
    lines, detach = _log_lines("xfuser.benchmark.cache_execute")
    try:
        assert bench.main([
            "--model_type", "tiny-pixart-sigma", "--num_inference_steps", "3", "--repeats", "2",
            "--thresholds", "0", "0.5", "--motion_threshold", "0", "--prompts", "a red circle", "a blue square",
            "--peer_thresholds", "0.5", "--report", "--output_dir", str(out),
        ]) == 0
    finally:
        detach()
    results = _strict(out / "results.json")
    assert results["lpips"]["available"] or results["lpips"]["reason"].startswith("skipped")
    assert set(results["overhead"]) == {"Fast", "Fb", "Tea"}
    kinds = {(r["method"], r["kind"]) for r in results["runs"]}
    assert {("Fast", "xfuser"), ("Fb", "xfuser"), ("Tea", "xfuser"), ("diffusers-FBCache", "peer")} <= kinds
    n = 1 + 3 + len(results["runs"])  # uncached reference, 3 overheads, every cached run
    assert results["progress"] == {"finished": n, "total": n, "complete": True}
    progress = [line for line in lines if line.startswith("configuration ")]
    assert [line.split(":")[0] for line in progress] == [f"configuration {i} of {n}" for i in range(1, n + 1)]
    assert all("ETA" in line for line in progress)
    for run in results["runs"]:
        assert len(run["images"]) == 2 and all((out / p).is_file() for p in run["images"])
        assert run["speedup"] == pytest.approx(run["baseline_latency_s"] / run["latency_s"])
        # per-repeat pairs (2 cases x 2 repeats) behind the headline numbers and their spread
        assert [len(c) for c in run["latency_runs_s"]] == [len(c) for c in run["baseline_runs_s"]] == [2, 2]
        assert run["baseline_latency_s"] == pytest.approx(statistics.median(min(c) for c in run["baseline_runs_s"]))
        ratios = [b / c for bs, cs in zip(run["baseline_runs_s"], run["latency_runs_s"]) for b, c in zip(bs, cs)]
        assert run["paired_speedup"]["min"] == pytest.approx(min(ratios)) and run["paired_speedup"]["repeats"] == 2
        assert run["paired_speedup"]["max"] == pytest.approx(max(ratios))
        assert run["psnr_worst"] == min(run["psnr"])
        if run["kind"] == "xfuser":
            assert run["hit_ratio"] <= run["skipped_fraction"] + 1e-12 and run["hit_ratio"] + run["partial_ratio"] <= 1.0
        if run["kind"] == "xfuser" and run["threshold"] == 0:
            # threshold 0 reuses nothing: the image is the uncached one, exactly
            assert run["psnr"] == [math.inf, math.inf] and run["hit_ratio"] == 0.0
    for m, spread in results["overhead_spread"].items():
        timings = results["overhead_runs"][m]
        ratios = [c / b - 1 for bs, cs in zip(timings["baseline_runs_s"], timings["latency_runs_s"]) for b, c in zip(bs, cs)]
        assert (spread["min"], spread["max"]) == (pytest.approx(min(ratios)), pytest.approx(max(ratios)))
    for name in ("report.html", "comparison_grid.png", "speed_quality.png"):
        assert (out / name).is_file()
    assert not list(out.glob("*.tmp"))


def test_cache_execute_keeps_finished_configurations_when_interrupted(tmp_path, monkeypatch):
    """results.json is rewritten after every configuration: a run stopped in its 6th of 6 keeps
    the 5 that finished and says it is incomplete."""
    bench = _load("benchmark/cache_execute.py", "cache_execute_interrupted")
    measure, calls = bench.Bench.measure, []

    def interrupted(self, name, *args, **kwargs):
        calls.append(name)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return measure(self, name, *args, **kwargs)

    monkeypatch.setattr(bench.Bench, "measure", interrupted)
    out = tmp_path / "bench"
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--model_type", "tiny-pixart-sigma", "--num_inference_steps", "2", "--repeats", "1",
                    "--cache_methods", "None", "Fast", "--thresholds", "0", "0.5", "--prompts", "a red circle",
                    "--no-peers", "--output_dir", str(out)])
    assert calls == ["None", "overhead_Fast", "overhead_Fb", "overhead_Tea", "Fast_0", "Fast_0.5"]
    results = _strict(out / "results.json")
    assert results["progress"] == {"finished": 5, "total": 6, "complete": False}
    assert [r["label"] for r in results["runs"]] == ["Fast 0"] and set(results["overhead"]) == {"Fast", "Fb", "Tea"}
    assert not list(out.glob("*.tmp"))
    report = _load("benchmark/report.py", "report_on_partial")
    assert report.findings(report.load_results(out / "results.json"))[0].startswith(
        "This run is incomplete: 5 of 6 configurations finished")


def test_run_fastcache_test_compares_with_the_uncached_image(tmp_path):
    script = _load("examples/run_fastcache_test.py", "run_fastcache_test")
    result = script.main([
        "--model_type", "tiny-pixart-sigma", "--num_inference_steps", "3", "--cache_method", "Fb",
        "--cache_ratio_threshold", "0", "--compare_baseline", "--output_dir", str(tmp_path),
    ])
    assert result["psnr"] == math.inf and result["speedup"] > 0
    stats = _strict(tmp_path / "tiny-pixart-sigma_Fb_stats.json")
    assert stats["cache"]["method"] == "Fb" and stats["cache"]["num_steps"] == 3
    assert (tmp_path / "tiny-pixart-sigma_Fb.png").is_file() and (tmp_path / "tiny-pixart-sigma_None.png").is_file()


def test_run_fastcache_test_rejects_bad_threshold_before_loading(tmp_path, monkeypatch):
    from xfuser.config.config import ConfigError

    script = _load("examples/run_fastcache_test.py", "run_fastcache_test_bad")
    monkeypatch.setattr(script, "load_pipeline", lambda *a, **k: pytest.fail("loaded a model for bad input"))
    with pytest.raises(ConfigError, match="cache_ratio_threshold"):
        script.main(["--model_type", "tiny-pixart-sigma", "--cache_ratio_threshold", "-1", "--output_dir", str(tmp_path)])


def test_benchmark_shell_script_writes_the_report(tmp_path):
    def script(out: str, *args: str, **env_vars: str) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != "SWEEP"}
        env.update(OUTPUT_DIR=str(tmp_path / out), OMP_NUM_THREADS="1", STEPS="2", **env_vars)
        return subprocess.run(["bash", str(ROOT / "examples/run_fastcache_benchmark.sh"), "tiny-pixart-sigma", "--", *args],
                              capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)

    proc = script("out", "--repeats", "1", "--thresholds", "0.5", "--prompts", "a red circle", "--no-peers")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    results = _strict(out / "results.json")
    assert {r["method"] for r in results["runs"]} == {"Fast", "Fb", "Tea"}
    assert "--sweep" not in results["command"].split()  # the default run is not the full sweep ...
    assert "--peer_thresholds 0.1" in results["command"]  # ... and runs each peer at one threshold
    assert results["progress"] == {"finished": 7, "total": 7, "complete": True}  # uncached, 3 overheads, 3 runs
    assert "configuration 1 of 7: uncached reference" in proc.stderr and "configuration 7 of 7" in proc.stderr
    assert (out / "report.html").is_file() and (out / "comparison_grid.png").is_file()
    assert "no spread is available" in (out / "report.html").read_text(encoding="utf-8")  # 1 repeat

    swept = script("swept", "--cache_methods", "Fast", "--repeats", "1", "--prompts", "a red circle", "--no-peers",
                   SWEEP="1")
    assert swept.returncode == 0, swept.stderr[-3000:]
    results = _strict(tmp_path / "swept" / "results.json")
    assert "--sweep" in results["command"].split()
    sweep = _load("benchmark/cache_execute.py", "cache_execute_sweep")
    expected = [(t, c) for c in sweep.SWEEP_CAPS for t in sweep.SWEEP_THRESHOLDS["Fast"]]
    assert [(r["threshold"], r["max_cached_steps"]) for r in results["runs"]] == expected


def test_video_benchmark_end_to_end(tmp_path):
    video = _load("benchmark/video_cache_execute.py", "video_cache_execute")
    out = tmp_path / "video"
    assert video.main([
        "--model_type", "tiny-cogvideox", "--num_inference_steps", "2", "--num_frames", "5",
        "--cache_methods", "All", "--cache_ratio_threshold", "0", "--motion_threshold", "0", "--output_dir", str(out),
    ]) == 0
    results = _strict(out / "results.json")
    frames = results["num_frames"]  # what the tiny VAE decodes 2 latent frames into
    assert frames >= 3
    assert {r["method"] for r in results["runs"]} == {"Fast", "Fb", "Tea"}
    for run in results["runs"]:
        assert len(run["psnr_per_frame"]) == frames and all(p == math.inf for p in run["psnr_per_frame"])
        assert run["rel_l2_latents"] == [0.0]
        assert (out / run["images"][0]).is_file() and (out / f"{run['method']}_0_stats.json").is_file()
    assert (out / "None.gif").is_file() and (out / "report.html").is_file()


@pytest.mark.parametrize("script,model_type,extra", [
    ("examples/hunyuandit_example.py", "hunyuandit", ["--height", "64", "--width", "64"]),
    ("examples/stepvideo_example.py", "stepvideo", ["--height", "32", "--width", "32", "--num_frames", "9",
                                                    "--max_sequence_length", "16"]),
])
def test_model_examples_run_from_a_saved_checkpoint(tmp_path, script, model_type, extra):
    from xfuser.testing.tiny_pipelines import save_tiny_pipeline

    model = save_tiny_pipeline(model_type, tmp_path / "model")
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), "--model", str(model), "--num_inference_steps", "3", "--cache_method", "Fast",
         "--guidance_scale", "3", "--output_dir", str(out), *extra],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    suffix = "gif" if model_type == "stepvideo" else "png"
    assert (out / f"{model_type}_dp1_cfg1_ulysses1_ring1_pp1_patch1_Fast.{suffix}").is_file()
    assert (out / f"{model_type}_dp1_cfg1_ulysses1_ring1_pp1_patch1_Fast_stats.json").is_file()


def test_consisid_example_with_precomputed_face_embeddings_on_2_ranks(tmp_path):
    from xfuser.testing.multiprocess import run_torchrun
    from xfuser.testing.tiny_pipelines import save_tiny_pipeline, tiny_call_kwargs

    model = save_tiny_pipeline("consisid", tmp_path / "model")
    face = {k: tiny_call_kwargs("consisid")[k] for k in ("image", "id_cond", "id_vit_hidden")}
    torch.save(face, tmp_path / "face.pt")
    out = tmp_path / "results"
    proc = run_torchrun(
        ["examples/consisid_example.py", "--model", str(model), "--face_embeddings", str(tmp_path / "face.pt"),
         "--ulysses_degree", "2", "--num_inference_steps", "3", "--cache_method", "Tea", "--height", "32", "--width", "32",
         "--num_frames", "9", "--max_sequence_length", "16", "--guidance_scale", "3", "--output_dir", str(out),
         "--debug_cache_agreement"],
        nproc_per_node=2, timeout_s=240, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "consisid_dp1_cfg1_ulysses2_ring1_pp1_patch1_Tea.gif").is_file()


def test_example_with_a_model_that_is_no_directory_and_no_hub_id_ends_in_one_line(tmp_path):
    """(A face is no longer required: tests/test_consisid_cli.py.) ``--model x`` names neither a
    directory nor an owner/name hub id: one ``error:`` line, exit 2, no traceback."""
    proc = subprocess.run([sys.executable, str(ROOT / "examples/consisid_example.py"), "--model", "x"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: --model x: no such directory, and not a hub id (owner/name); give a diffusers "
                      "checkpoint directory or a hub id"], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def test_parallel_benchmark_under_torchrun(tmp_path):
    from xfuser.testing.multiprocess import run_torchrun
    from xfuser.testing.tiny_pipelines import save_tiny_pipeline

    model = save_tiny_pipeline("pixart-sigma", tmp_path / "model")
    out = tmp_path / "parallel"
    proc = run_torchrun(
        ["benchmark/cache_execution_xfuser.py", "--model", str(model), "--ulysses_degree", "2", "--cache_methods", "None",
         "Fb", "--cache_ratio_threshold", "0", "--num_inference_steps", "3", "--height", "32", "--width", "32",
         "--max_sequence_length", "16", "--repeats", "1", "--output_dir", str(out), "--single_process_reference"],
        nproc_per_node=2, timeout_s=240, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = _strict(out / "results_parallel.json")
    assert report["parallel"]["ulysses"] == 2 and len(report["per_rank"]) == 2
    for rank in report["per_rank"]:
        fb = rank["Fb"]
        # threshold 0: Fb computes everything, so its image is the uncached one
        assert fb["psnr_vs_uncached"] == math.inf and fb["rel_l2_vs_uncached"] == 0.0
        assert rank["None"]["bytes_sent_per_image"] > 0  # the Ulysses all-to-alls were counted
        # Ulysses is exact: each method matches its own single-process run
        for method in ("None", "Fb"):
            assert rank[method]["rel_l2_vs_single_process_same_cache"] < 1e-5, rank[method]
