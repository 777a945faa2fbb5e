"""FastCache's learned forecast: calibration, the file, its checks, and what it buys."""
from __future__ import annotations

import pytest
import torch

from xfuser import xFuserArgs, xFuserFastCachePipelineWrapper
from xfuser.config import CacheConfig, ConfigError
from xfuser.model_executor.cache.calibrate import main as calibrate
from xfuser.model_executor.cache.forecast import FILENAME, ForecastError, LearnedForecast
from xfuser.model_executor.cache.forecast_fit import fit_forecast, forecast_errors, record_trajectories
from xfuser.testing.tiny_pipelines import save_tiny_pipeline, tiny_call_kwargs

STEPS = 6
CAL_ARGS = ["--num_inference_steps", str(STEPS), "--prompts", "a red circle", "a blue square", "--height", "32", "--width", "32",
            "--max-gap", "3"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A locally saved tiny PixArt-Σ with a calibration written beside it by the command."""
    model = save_tiny_pipeline("pixart-sigma", tmp_path_factory.mktemp("tiny") / "model")
    assert calibrate(["--model", str(model), "--method", "Fast", *CAL_ARGS]) == 0
    return model


def _kwargs():
    kwargs = tiny_call_kwargs("pixart-sigma")
    for key in ("prompt", "num_inference_steps", "output_type", "generator"):
        kwargs.pop(key)
    return kwargs


def _run(wrapper, steps=STEPS, prompt="a green triangle"):
    out = wrapper(prompt=prompt, num_inference_steps=steps, output_type="latent", generator=torch.Generator().manual_seed(3), **_kwargs())
    return out.images


def _from_dir(path):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(path), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_calibration_round_trip_and_determinism(tiny_dir, tmp_path):
    path = tiny_dir / FILENAME
    forecast = LearnedForecast.load(path)
    assert forecast.num_steps == STEPS and forecast.max_gap == 3 and forecast.meta["transformer"] == "PixArtTransformer2DModel"
    # fit -> save -> load gives the same predictions
    pipe = _from_dir(tiny_dir)
    traj = record_trajectories(pipe, ["a red circle", "a blue square"], STEPS, seed=0, height=32, width=32)
    fitted = fit_forecast(traj, pipe.transformer, max_gap=3, meta=forecast.meta)
    x, ref, r = (torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(i)) for i in range(3))
    trend = torch.randn(2, 16, 64)
    for block, step, gap in ((0, 2, 1), (1, 4, 2), (1, 5, 3)):
        assert torch.equal(fitted.predict(block, step, gap, 0, x, ref, r, trend), forecast.predict(block, step, gap, 0, x, ref, r, trend))
    assert torch.equal(fitted.error, forecast.error)
    # the same prompts, seed and steps give the same file, byte for byte
    again = tmp_path / "again.safetensors"
    assert calibrate(["--model", str(tiny_dir), "--method", "Fast", *CAL_ARGS, "--out", str(again)]) == 0
    assert again.read_bytes() == path.read_bytes()


def test_learned_forecast_beats_reuse_and_extrapolation_on_held_out_prompts():
    """On the embedded trained model's real blocks: fitted on calibration prompts, scored on
    prompts it never saw, computing every 2nd and every 3rd step."""
    from xfuser.config.defaults import default_model_path
    from xfuser.testing.shapes import heldout_captions

    pipe = _from_dir(default_model_path())
    steps = 10
    cal = record_trajectories(pipe, ["a red triangle on a white background, top right", "a white square on a yellow background, top right",
                                     "a yellow circle on a white background, center"], steps, seed=0)
    held = record_trajectories(pipe, [heldout_captions()[0], heldout_captions()[24]], steps, seed=100)
    forecast = fit_forecast(cal, pipe.transformer, max_gap=3)
    for cadence in (2, 3):
        learned = forecast_errors(forecast, held, cadence)
        reuse = forecast_errors(None, held, cadence, "reuse")
        extrapolate = forecast_errors(None, held, cadence, "extrapolate")
        assert learned < 0.9 * min(reuse, extrapolate), (cadence, learned, reuse, extrapolate)


def test_embedded_model_finds_its_calibration_and_falls_back_for_other_step_counts(caplog):
    from xfuser.config.defaults import default_model_path

    from xfuser.model_executor.pipelines.call_args import prepare_call_kwargs

    pipe = _from_dir(default_model_path())
    kwargs = prepare_call_kwargs(pipe)
    wrapper = xFuserFastCachePipelineWrapper(pipe).enable_fastcache(cache_ratio_threshold=0.3)
    wrapper(prompt="a black circle on a green background, top left", num_inference_steps=20, output_type="latent",
            generator=torch.Generator().manual_seed(0), **kwargs)
    stats = wrapper.get_cache_statistics()
    assert stats["forecast"]["source"].endswith(FILENAME)
    assert any(a == "A" for _, actions, _ in wrapper.manager.decision_log() for a in actions)
    assert stats["cache_state_bytes"]["total"] > 0
    # a run with another step count: the file found beside the model does not apply -> first-order forecast
    wrapper(prompt="a black circle on a green background, top left", num_inference_steps=8, output_type="latent",
            generator=torch.Generator().manual_seed(0), **kwargs)
    assert "forecast" not in wrapper.get_cache_statistics()


def test_threshold_zero_with_a_calibration_reproduces_uncached(tiny_dir):
    pipe = _from_dir(tiny_dir)
    wrapper = xFuserFastCachePipelineWrapper(pipe)
    reference = _run(wrapper)
    wrapper.enable_fastcache(cache_ratio_threshold=0.0)
    assert torch.equal(_run(wrapper), reference)
    wrapper.enable_fastcache(cache_ratio_threshold=5.0)
    cached = _run(wrapper)
    assert wrapper.get_cache_statistics()["forecast"]["source"] == str(tiny_dir / FILENAME)
    assert not torch.equal(cached, reference)
    assert torch.equal(_run(wrapper), cached), "identical calls must give identical outputs"


def _count_calls(pipe):
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls


def test_mismatched_or_corrupt_calibration_fails_before_compute(tiny_dir, tmp_path):
    pipe = _from_dir(tiny_dir)
    calls = _count_calls(pipe)
    explicit = str(tiny_dir / FILENAME)
    wrapper = xFuserFastCachePipelineWrapper(pipe).enable_fastcache(cache_ratio_threshold=0.5, calibration=explicit)
    with pytest.raises(ForecastError, match="--num_inference_steps 6.*calibrate"):
        _run(wrapper, steps=4)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ForecastError, match="calibrate"):
        wrapper.enable_fastcache(calibration=str(corrupt))
    other = tmp_path / "flux.safetensors"
    from xfuser.testing.tiny_pipelines import calibrate_tiny_fastcache

    calibrate_tiny_fastcache("flux", other, STEPS)
    with pytest.raises(ForecastError, match="calibrated for FluxTransformer2DModel"):
        wrapper.enable_fastcache(calibration=str(other))
    with pytest.raises(ConfigError, match="--fastcache_calibration .*no such file"):
        CacheConfig(method="Fast", calibration=str(tmp_path / "missing.safetensors"))
    with pytest.raises(ConfigError, match="no such file"):
        xFuserArgs(model=str(tiny_dir), fastcache_calibration=str(tmp_path / "missing")).create_config(world_size=1)
    assert not calls, "a transformer call ran before the error"


def test_cache_state_bytes_are_reported_for_every_method(tiny_dir):
    pipe = _from_dir(tiny_dir)
    wrapper = xFuserFastCachePipelineWrapper(pipe)
    for method in ("Fast", "Fb", "Tea"):
        wrapper.enable_cache(method, cache_ratio_threshold=0.5)
        _run(wrapper)
        state = wrapper.get_cache_statistics()["cache_state_bytes"]
        assert state["total"] == sum(state["per_block"]) > 0, method
        assert len(state["per_block"]) == wrapper.manager.num_blocks


def test_calibrate_rejects_bad_options(tiny_dir, tmp_path):
    with pytest.raises(SystemExit):
        calibrate(["--model", str(tiny_dir), "--method", "Fast", "--max-gap", "0"])
    with pytest.raises(SystemExit):
        calibrate(["--model", str(tiny_dir), "--method", "Fast", "--groups", "7", *CAL_ARGS, "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit):
        calibrate(["--model", str(tiny_dir), "--method", "Fast", "--prompts-file", str(tmp_path / "none.txt")])


def test_calibration_prompts_are_disjoint_from_every_evaluation_prompt():
    import importlib.util
    from pathlib import Path

    from xfuser.config.defaults import default_model_path
    from xfuser.model_executor.cache.calibrate import DEFAULT_PROMPTS, calibration_prompts
    from xfuser.testing.shapes import heldout_captions, train_captions

    prompts = calibration_prompts(default_model_path(), None, None, None)
    assert len(prompts) == 12 and set(prompts) <= set(train_captions())
    spec = importlib.util.spec_from_file_location("cache_execute", Path(__file__).parents[1] / "benchmark" / "cache_execute.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    evaluation = set(bench.DEFAULT_PROMPTS) | set(bench.HELDOUT_PROMPTS) | set(DEFAULT_PROMPTS) | set(heldout_captions())
    assert not set(prompts) & evaluation
    assert set(bench.HELDOUT_PROMPTS) <= set(heldout_captions())
    assert calibration_prompts(default_model_path(), None, None, 3) == prompts[:3]
