"""ConsisID from the command line (face flags, the generated default face) and explicit video
sizes reaching the pipeline in benchmark/video_cache_execute.py and examples/consisid_example.py."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from xfuser.config.config import ConfigError
from xfuser.model_executor.pipelines import consisid_inputs
from xfuser.model_executor.pipelines.consisid_inputs import (
    VIT_TOKENS,
    check_face_args,
    generated_face_inputs,
    load_face_embeddings,
    missing_face_packages,
)

ROOT = Path(__file__).resolve().parents[1]
GENERATED_LINE = "ConsisID face: no --face_image or --face_embeddings given, so generated"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
needs_no_face_models = pytest.mark.skipif(not missing_face_packages(), reason="ConsisID's face models are installed here")


def _video_module():
    name = "video_cache_execute_consisid_cli"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmark/video_cache_execute.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _fake_consisid(is_kps: bool = False, **config):
    """Only what the face inputs read: the transformer config and the VAE's spatial factor."""
    cfg = dict(is_train_face=True, is_kps=is_kps, LFE_id_dim=1280, LFE_vit_dim=1024, LFE_num_scale=5,
               sample_height=60, sample_width=90)
    cfg.update(config)
    return SimpleNamespace(transformer=SimpleNamespace(config=SimpleNamespace(**cfg)), vae_scale_factor_spatial=8)


def _face_png(path: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 150, 120)).save(path)
    return path


# ------------------------------------------------------------------------------ generated face
def test_generated_face_has_the_shapes_the_transformer_config_asks_for():
    pipe = _fake_consisid(is_kps=True)
    inputs = generated_face_inputs(pipe, seed=3)  # no size: the transformer's native 480x720
    assert inputs["image"].size == (720, 480)
    assert inputs["id_cond"].shape == (1, 1280)
    assert [t.shape for t in inputs["id_vit_hidden"]] == [(1, VIT_TOKENS, 1024)] * 5
    kps = np.asarray(inputs["kps_cond"])
    assert kps.shape == (5, 2) and (kps[:, 0] > 0).all() and (kps[:, 0] < 720).all() and (kps[:, 1] < 480).all()
    # a face, not a flat fill: the drawing has skin, hair and background colours
    assert len(inputs["image"].getcolors(maxcolors=1 << 16) or []) >= 4

    small = generated_face_inputs(_fake_consisid(LFE_id_dim=16, LFE_vit_dim=8, LFE_num_scale=2), 40, 48, seed=3)
    assert small["image"].size == (48, 40) and "kps_cond" not in small  # is_kps off: no keypoints
    assert small["id_cond"].shape == (1, 16) and [t.shape[-1] for t in small["id_vit_hidden"]] == [8, 8]


def test_generated_face_is_deterministic_per_seed():
    pipe = _fake_consisid(LFE_id_dim=16, LFE_vit_dim=8, LFE_num_scale=2)
    a, b, c = (generated_face_inputs(pipe, 32, 32, seed=s) for s in (7, 7, 8))
    assert torch.equal(a["id_cond"], b["id_cond"]) and all(torch.equal(x, y) for x, y in zip(a["id_vit_hidden"], b["id_vit_hidden"]))
    assert a["image"].tobytes() == b["image"].tobytes()
    assert not torch.equal(a["id_cond"], c["id_cond"])


def test_face_without_identity_branch_gets_only_an_image():
    inputs = generated_face_inputs(_fake_consisid(is_train_face=False), 32, 32)
    assert set(inputs) == {"image"}


# ------------------------------------------------------------------------------ face flags, checked early
def test_face_flag_files_must_exist(tmp_path):
    with pytest.raises(ConfigError, match=r"--face_image/--img_file_path .*nope.png: no such file"):
        check_face_args(str(tmp_path / "nope.png"), None)
    with pytest.raises(ConfigError, match=r"--face_embeddings .*face.pt: no such file"):
        check_face_args(None, str(tmp_path / "face.pt"))


@needs_no_face_models
def test_face_image_without_face_models_names_what_to_install(tmp_path):
    with pytest.raises(ConfigError) as err:
        check_face_args(str(_face_png(tmp_path / "face.png")), None)
    message = str(err.value)
    for package in missing_face_packages():
        assert package in message
    assert "pip install" in message and "--face_embeddings" in message


def test_face_embeddings_file_is_checked_against_the_transformer(tmp_path):
    pipe = _fake_consisid(LFE_id_dim=16, LFE_vit_dim=8, LFE_num_scale=2)
    good = generated_face_inputs(pipe, 32, 32, seed=0)
    torch.save(good, tmp_path / "good.pt")
    loaded = load_face_embeddings(str(tmp_path / "good.pt"), pipe)
    assert torch.equal(loaded["id_cond"], good["id_cond"])

    torch.save({**good, "id_cond": torch.zeros(1, 12)}, tmp_path / "dim.pt")
    with pytest.raises(ConfigError, match=r"--face_embeddings .*id_cond must be a tensor \(1, 16\).*LFE_id_dim"):
        load_face_embeddings(str(tmp_path / "dim.pt"), pipe)
    torch.save({**good, "id_vit_hidden": good["id_vit_hidden"][:1]}, tmp_path / "scales.pt")
    with pytest.raises(ConfigError, match=r"id_vit_hidden must be a list of 2 tensors"):
        load_face_embeddings(str(tmp_path / "scales.pt"), pipe)
    torch.save({"image": good["image"]}, tmp_path / "partial.pt")
    with pytest.raises(ConfigError, match=r"lacks \['id_cond', 'id_vit_hidden'\]"):
        load_face_embeddings(str(tmp_path / "partial.pt"), pipe)


@needs_no_face_models
def test_video_benchmark_face_image_without_face_models_fails_before_loading(tmp_path, monkeypatch):
    video = _video_module()
    monkeypatch.setattr(video, "load_pipeline", lambda *a, **k: pytest.fail("loaded a model for an unusable --face_image"))
    with pytest.raises(ConfigError, match="--face_image.*pip install"):
        video.main(["--model_type", "tiny-consisid", "--face_image", str(_face_png(tmp_path / "face.png")),
                    "--output_dir", str(tmp_path / "out")])


@needs_no_face_models
@pytest.mark.parametrize("flag", ["--face_image", "--img_file_path"])
def test_consisid_example_face_image_without_face_models_is_one_error_line(tmp_path, flag):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples/consisid_example.py"), "--model", str(tmp_path / "no-such-model"),
         flag, str(_face_png(tmp_path / "face.png")), "--output_dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=ENV,
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    # one line, and it came before the (missing) model was even looked at
    assert len(lines) == 1 and lines[0].startswith("error: --face_image") and "pip install" in lines[0], lines
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ runs without a face
def test_video_benchmark_consisid_without_a_face_runs_at_the_requested_size(tmp_path):
    out = tmp_path / "video"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmark/video_cache_execute.py"), "--model_type", "tiny-consisid",
         "--prompt", "a time lapse of a blooming flower", "--height", "40", "--width", "48", "--num_frames", "9",
         "--num_inference_steps", "2", "--cache_methods", "Fb", "--cache_ratio_threshold", "0", "--no-report",
         "--output_dir", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=ENV,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    generated = [line for line in proc.stderr.splitlines() if GENERATED_LINE in line]
    assert len(generated) == 1 and "meaningless" in generated[0] and "40x48" in generated[0], proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert (results["height"], results["width"], results["num_frames"]) == (40, 48, 9)
    assert [r["method"] for r in results["runs"]] == ["Fb"]


def test_consisid_example_without_a_face_runs_at_the_requested_size(tmp_path):
    from xfuser.testing.tiny_pipelines import save_tiny_pipeline

    model = save_tiny_pipeline("consisid", tmp_path / "model")
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples/consisid_example.py"), "--model", str(model), "--height", "40",
         "--width", "48", "--num_frames", "9", "--max_sequence_length", "16", "--num_inference_steps", "2",
         "--guidance_scale", "3", "--output_type", "np", "--output_dir", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=ENV,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sum(GENERATED_LINE in line for line in proc.stderr.splitlines()) == 1, proc.stderr[-3000:]
    saved = sorted(out.glob("consisid_dp1_cfg1_ulysses1_ring1_pp1_patch1_*.npy"))
    assert len(saved) == 1, sorted(p.name for p in out.iterdir())
    frames = np.load(saved[0])
    assert frames.shape == (1, 9, 40, 48, 3)


# ------------------------------------------------------------------------------ video benchmark, in process
def _bench(tmp_path, *argv: str):
    video = _video_module()
    args = video.parse_args([*argv, "--num_inference_steps", "2", "--output_dir", str(tmp_path)])
    torch.set_grad_enabled(False)
    return video.VideoBench(args)


def test_face_embeddings_file_drives_the_video(tmp_path):
    """The file's inputs are the ones used: the generated face saved and passed back gives the same
    video; another face gives another video."""
    base = _bench(tmp_path, "--model_type", "tiny-consisid", "--seed", "5")
    ref = base.run_once()[0]
    same = {k: base.kwargs[k] for k in ("image", "id_cond", "id_vit_hidden")}
    torch.save(same, tmp_path / "same.pt")
    other = generated_face_inputs(base.pipe, 32, 32, seed=99)
    torch.save(other, tmp_path / "other.pt")
    frames_same = _bench(tmp_path, "--model_type", "tiny-consisid", "--seed", "5", "--face_embeddings", str(tmp_path / "same.pt")).run_once()[0]
    frames_other = _bench(tmp_path, "--model_type", "tiny-consisid", "--seed", "5", "--face_embeddings", str(tmp_path / "other.pt")).run_once()[0]
    np.testing.assert_array_equal(frames_same, ref)
    assert np.abs(frames_other - ref).max() > 0


@pytest.mark.parametrize("model_type,height,width", [
    ("tiny-cogvideox", 48, 40), ("tiny-cogvideox1.5", 24, 32), ("tiny-stepvideo", 48, 64), ("tiny-consisid", 24, 40),
])
def test_explicit_size_wins_over_the_model_type_defaults(tmp_path, model_type, height, width):
    bench = _bench(tmp_path, "--model_type", model_type, "--height", str(height), "--width", str(width), "--num_frames", "5")
    assert (bench.kwargs["height"], bench.kwargs["width"], bench.kwargs["num_frames"]) == (height, width, 5)  # defaults: 9
    frames = bench.run_once()[0]
    assert frames.shape[1:3] == (height, width)


def test_size_the_model_cannot_take_is_refused_before_compute(tmp_path, monkeypatch):
    video = _video_module()
    monkeypatch.setattr(video.VideoBench, "run_once", lambda self: pytest.fail("computed for a bad size"))
    monkeypatch.setattr(consisid_inputs, "generated_face_inputs", lambda *a, **k: pytest.fail("made a face for a bad size"))
    with pytest.raises(ConfigError, match=r"--height 36: not divisible by 8"):
        video.main(["--model_type", "tiny-consisid", "--height", "36", "--output_dir", str(tmp_path)])
    with pytest.raises(ConfigError, match=r"--width 48: .*rotary position table.*use --width <= 32"):
        video.main(["--model_type", "tiny-cogvideox1.5", "--width", "48", "--output_dir", str(tmp_path)])


def test_face_flag_on_a_model_without_a_face_is_refused(tmp_path):
    torch.save({}, tmp_path / "face.pt")
    with pytest.raises(ConfigError, match="only ConsisID takes a face"):
        _bench(tmp_path, "--model_type", "tiny-cogvideox", "--face_embeddings", str(tmp_path / "face.pt"))
