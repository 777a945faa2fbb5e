"""Parallel runners with every cache method == the single-process run, on gloo ranks.

Each multi-rank run builds the same tiny pipeline on every rank (same seed, same weights),
runs all four cache methods in turn, and returns latents + decision logs per method. The
test compares each rank's latents with a single-process run of the same configuration and
checks that the decision logs agree across ranks and with the single process.
"""
from __future__ import annotations

import pytest
import torch

from xfuser.seeding import sample_generators
from xfuser.testing.multiprocess import run_on_ranks

METHODS = {
    # thresholds chosen so every method actually caches some steps on the tiny models
    "None": dict(cache_method="None"),
    "Fb": dict(cache_method="Fb", cache_ratio_threshold=0.6),
    "Tea": dict(cache_method="Tea", cache_ratio_threshold=0.8),
    "Fast": dict(cache_method="Fast", cache_ratio_threshold=0.5, motion_threshold=0.5),
    # the fitted-map path: statistics summed over the sync group, one A on every rank
    "FastFitted": dict(cache_method="Fast", cache_ratio_threshold=0.5, motion_threshold=0.5, approximation="auto", max_cached_steps=1),
}
STEPS = 6


def _methods(calibration: str) -> dict:
    """METHODS plus FastCache with a learned forecast fitted for this tiny model (token
    reduction on, so both the forecast and the partial-block path run under the runner)."""
    learned = dict(cache_method="Fast", cache_ratio_threshold=1.0, motion_threshold=0.5, fastcache_calibration=calibration)
    return {**METHODS, "FastLearned": learned}


def _inputs(model_type: str, dp: int):
    from xfuser.testing.tiny_pipelines import tiny_call_kwargs

    kwargs = tiny_call_kwargs(model_type)
    prompt = kwargs.pop("prompt")
    prompts = [prompt] if dp == 1 else [prompt, "a blue square on a white background"][:dp]
    for key in ("generator", "num_inference_steps", "output_type"):
        kwargs.pop(key, None)
    return prompts, kwargs


def _args(model_type: str, prompts, extra, parallel: dict, method: dict):
    from xfuser import xFuserArgs

    return xFuserArgs(
        model="tiny", prompt=prompts, num_inference_steps=STEPS, seed=7, output_type="latent",
        height=extra.get("height"), width=extra.get("width"), guidance_scale=extra.get("guidance_scale"),
        max_sequence_length=extra.get("max_sequence_length"), cache_warmup_steps=1,
        debug_cache_agreement=True, **parallel, **method,
    )


def _latents(out) -> torch.Tensor:
    """Image pipelines return ``images``, video pipelines ``frames`` (latents with output_type="latent")."""
    return (out.images if hasattr(out, "images") else out.frames).clone()


def _parallel_worker(rank: int, world: int, model_type: str, parallel: dict, calibration: str) -> dict:
    from xfuser.parallel import xDiTParallel
    from xfuser.testing.tiny_pipelines import build_tiny_pipeline

    pipe = build_tiny_pipeline(model_type)
    pipe.set_progress_bar_config(disable=True)
    prompts, extra = _inputs(model_type, parallel.get("data_parallel_degree", 1))
    runner = None
    results = {}
    for name, method in _methods(calibration).items():
        engine, inputs = _args(model_type, prompts, extra, parallel, method).create_config(world_size=world)
        if runner is None:
            runner = xDiTParallel(pipe, engine, inputs)
        else:
            runner.inputs = inputs
            runner.enable_cache(engine.cache_config)
        out = runner(**{k: v for k, v in extra.items() if k not in ("height", "width", "guidance_scale", "max_sequence_length")})
        first = runner.inputs.prompt.index(runner.local_prompts()[0])
        results[name] = {"latents": _latents(out), "log": runner.manager.decision_log(), "prompts": runner.local_prompts(), "first": first}
    return results


def _single_process(model_type: str, prompts, first: int, calibration: str) -> dict:
    """The wrapper in one process on ``prompts``, image i seeded as the runner seeds index first + i."""
    from xfuser import xFuserFastCachePipelineWrapper
    from xfuser.model_executor.pipelines.call_args import prepare_call_kwargs
    from xfuser.testing.tiny_pipelines import build_tiny_pipeline

    pipe = build_tiny_pipeline(model_type)
    pipe.set_progress_bar_config(disable=True)
    _, extra = _inputs(model_type, 1)
    wrapper = xFuserFastCachePipelineWrapper(pipe)
    out = {}
    for name, method in _methods(calibration).items():
        engine, inputs = _args(model_type, prompts, extra, {}, method).create_config(world_size=1)
        wrapper.enable_cache(config=engine.cache_config)
        kwargs = prepare_call_kwargs(pipe, inputs.height, inputs.width)
        kwargs.update({k: v for k, v in extra.items() if k not in ("height", "width")})
        result = wrapper(
            prompt=prompts, num_inference_steps=STEPS, output_type="latent",
            generator=sample_generators(7, len(prompts), first), **kwargs,
        )
        out[name] = {"latents": _latents(result), "log": wrapper.manager.decision_log()}
    return out


CONFIGS = [
    ("pixart-sigma", dict(ulysses_degree=2), 2),
    ("pixart-sigma", dict(ring_degree=2), 2),
    ("pixart-sigma", dict(ulysses_degree=2, ring_degree=2), 4),
    ("pixart-sigma", dict(use_cfg_parallel=True), 2),
    ("pixart-sigma", dict(use_cfg_parallel=True, ulysses_degree=2), 4),
    ("pixart-sigma", dict(data_parallel_degree=2), 2),
    ("pixart-alpha", dict(use_cfg_parallel=True, ulysses_degree=2), 4),
    ("flux", dict(ulysses_degree=2), 2),
    ("flux", dict(ring_degree=2), 2),
    ("hunyuandit", dict(ulysses_degree=2), 2),
    ("hunyuandit", dict(use_cfg_parallel=True, ring_degree=2), 4),
    ("cogvideox", dict(ulysses_degree=2), 2),
    ("cogvideox", dict(use_cfg_parallel=True), 2),
    ("cogvideox1.5", dict(ulysses_degree=2), 2),
    ("consisid", dict(ulysses_degree=2), 2),
    ("consisid", dict(use_cfg_parallel=True), 2),
]


def _id(config) -> str:
    model, parallel, _ = config
    short = {"ulysses_degree": "ulysses", "ring_degree": "ring", "use_cfg_parallel": "cfg", "data_parallel_degree": "dp"}
    return model + "-" + "-".join(f"{short[k]}{2 if v is True else v}" for k, v in parallel.items())


@pytest.mark.parametrize("model_type,parallel,world", CONFIGS, ids=[_id(c) for c in CONFIGS])
def test_parallel_output_equals_single_process_for_every_method(model_type, parallel, world, tmp_path):
    from xfuser.testing.tiny_pipelines import calibrate_tiny_fastcache

    calibration = str(calibrate_tiny_fastcache(model_type, tmp_path / "fastcache.safetensors", STEPS))
    run = run_on_ranks(_parallel_worker, world, model_type, parallel, calibration, timeout_s=300)
    references: dict = {}
    for rank, results in enumerate(run.results):
        prompts = results["None"]["prompts"]
        key = tuple(prompts)
        if key not in references:
            references[key] = _single_process(model_type, prompts, results["None"]["first"], calibration)
        ref = references[key]
        for name in _methods(calibration):
            got, want = results[name], ref[name]
            assert got["log"] == run.results[0][name]["log"] or parallel.get("data_parallel_degree", 1) > 1
            assert got["log"] == want["log"], f"rank {rank} {name}: decisions differ from single process"
            err = ((got["latents"] - want["latents"]).norm() / want["latents"].norm()).item()
            assert err <= 1e-5, f"rank {rank} {name}: relative error {err:.2e}"
    hits = [a for r in run.results for n in ("Fb", "Tea", "Fast", "FastFitted") for s in r[n]["log"] for a in s[1] if a != "C"]
    assert hits, "no method cached anything: the equivalence check would be vacuous"
    learned = [a for r in run.results for s in r["FastLearned"]["log"] for a in s[1] if a == "A"]
    assert learned, "the learned forecast was never used: its equivalence check would be vacuous"
