"""Same seed, same image: an output depends on (prompt, seed, index) only.

Not on its batch-mates (cache decisions are per sample), not on the data-parallel degree
(image i draws from seed + i), not on how the call was spelled (the step count comes from the
pipeline's real schedule), and a pipeline can be handed from one wrapper or runner to another.
"""
from __future__ import annotations

import pytest
import torch

from xfuser.seeding import sample_generators
from xfuser.testing.multiprocess import run_on_ranks

A = "a red circle on a blue background, top left"
B = "a green square in the bottom right corner"
STEPS = 8
# thresholds at which every method caches some steps of the tiny models, differently per prompt
METHODS = {
    "Fb": dict(cache_ratio_threshold=0.6),
    "Tea": dict(cache_ratio_threshold=0.8),
    "Fast": dict(cache_ratio_threshold=0.5, motion_threshold=0.5),
    "FastFitted": dict(cache_ratio_threshold=0.5, motion_threshold=0.5, approximation="auto", max_cached_steps=1),
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _kwargs(model_type: str) -> dict:
    from xfuser.testing.tiny_pipelines import tiny_call_kwargs

    kwargs = tiny_call_kwargs(model_type)
    for key in ("generator", "prompt", "num_inference_steps"):
        kwargs.pop(key)
    return kwargs


def _out(result) -> torch.Tensor:
    return result.images if hasattr(result, "images") else result.frames


@pytest.fixture(scope="module")
def tiny():
    from xfuser.testing.tiny_pipelines import build_tiny_pipeline

    pipes = {}

    def get(model_type: str):
        if model_type not in pipes:
            pipes[model_type] = build_tiny_pipeline(model_type)
            pipes[model_type].set_progress_bar_config(disable=True)
        return pipes[model_type]

    return get


def _method(name: str) -> tuple[str, dict]:
    return ("Fast" if name.startswith("Fast") else name), METHODS[name]


# ---------------------------------------------------------------------------- item 1
@pytest.mark.parametrize("model_type", ["pixart-sigma", "flux"])
@pytest.mark.parametrize("name", list(METHODS))
def test_batch_equals_each_sample_alone(tiny, model_type, name):
    """[A, B] in one call == A alone and B alone with the same seeds, for every method (CFG
    pairs on PixArt, no CFG on Flux), and the batch still skips work."""
    from xfuser import xFuserFastCachePipelineWrapper

    pipe, kwargs = tiny(model_type), _kwargs(model_type)
    method, cfg = _method(name)
    with xFuserFastCachePipelineWrapper(pipe) as wrapper:
        wrapper.enable_cache(method, cache_warmup_steps=1, **cfg)

        def run(prompts, first):
            out = wrapper(prompt=prompts, num_inference_steps=STEPS, generator=sample_generators(7, len(prompts), first), **kwargs)
            return _out(out), wrapper.get_cache_statistics()

        both, stats = run([A, B], 0)
        alone = [run([A], 0), run([B], 1)]
    logs = [[s["actions"] for s in a[1]["per_step"]] for a in alone]
    for i, (image, a_stats) in enumerate(alone):
        assert _rel(both[i], image[0]) <= 1e-5, f"sample {i} moved by its batch-mate"
        assert [s["patch_actions"][i] for s in stats["per_step"]] == logs[i], f"sample {i}: decisions differ from alone"
    assert stats["compute_fraction"] < 1.0, "the batched run skipped nothing"
    assert stats["compute_fraction"] == pytest.approx((alone[0][1]["compute_fraction"] + alone[1][1]["compute_fraction"]) / 2)


def test_samples_decide_differently_somewhere(tiny):
    """Non-vacuity of the test above: the two prompts' decisions do differ for some method, so
    a shared decision could not have passed it."""
    from xfuser import xFuserFastCachePipelineWrapper

    pipe, kwargs = tiny("pixart-sigma"), _kwargs("pixart-sigma")
    differ = []
    with xFuserFastCachePipelineWrapper(pipe) as wrapper:
        for name in METHODS:
            method, cfg = _method(name)
            wrapper.enable_cache(method, cache_warmup_steps=1, **cfg)
            wrapper(prompt=[A, B], num_inference_steps=STEPS, generator=sample_generators(7, 2), **kwargs)
            differ += [s["patch_actions"][0] != s["patch_actions"][1] for s in wrapper.get_cache_statistics()["per_step"]]
    assert any(differ)


def test_images_per_prompt_decide_on_their_own(tiny):
    """num_images_per_prompt=2: image 1 equals the prompt generated alone with seed + 1."""
    from xfuser import xFuserFastCachePipelineWrapper

    pipe, kwargs = tiny("pixart-sigma"), _kwargs("pixart-sigma")
    with xFuserFastCachePipelineWrapper(pipe) as wrapper:
        wrapper.enable_cache("Fast", cache_warmup_steps=1, **METHODS["Fast"])
        two = _out(wrapper(prompt=A, num_images_per_prompt=2, num_inference_steps=STEPS,
                           generator=sample_generators(7, 1, num_images_per_prompt=2), **kwargs))
        one = _out(wrapper(prompt=A, num_inference_steps=STEPS, generator=sample_generators(8, 1), **kwargs))
    assert _rel(two[1], one[0]) <= 1e-5


# ---------------------------------------------------------------------------- item 2
def _runner_args(prompts, seed: int, method: str = "None", **parallel):
    from xfuser import xFuserArgs

    extra = _kwargs("pixart-sigma")
    cfg = METHODS.get(method, {})
    return xFuserArgs(
        model="tiny", prompt=prompts, num_inference_steps=STEPS, seed=seed, output_type="latent",
        height=extra["height"], width=extra["width"], guidance_scale=extra["guidance_scale"],
        max_sequence_length=extra["max_sequence_length"], cache_warmup_steps=1, debug_cache_agreement=True,
        cache_method=_method(method)[0] if method != "None" else "None", **cfg, **parallel,
    )


def _runner_worker(rank: int, world: int, prompts, parallel: dict, methods: list[str]) -> dict:
    from xfuser.parallel import xDiTParallel
    from xfuser.testing.tiny_pipelines import build_tiny_pipeline

    pipe = build_tiny_pipeline("pixart-sigma")
    pipe.set_progress_bar_config(disable=True)
    runner, out = None, {}
    for method in methods:
        engine, inputs = _runner_args(prompts, 7, method, **parallel).create_config(world_size=world)
        if runner is None:
            runner = xDiTParallel(pipe, engine, inputs)
        else:
            runner.inputs = inputs
            runner.enable_cache(engine.cache_config)
        out[method] = {"latents": _out(runner()).clone(), "log": runner.manager.decision_log()}
    runner.close()
    return out


def test_runner_seeds_image_i_with_seed_plus_i():
    """One process: image 1 of [A, B] seeded 7 equals B alone seeded 8, for every method."""
    methods = ["None", "Fb", "Fast"]
    both = _runner_worker(0, 1, [A, B], {}, methods)
    alone = _runner_worker(0, 1, [B], {}, methods)  # seed 7 for index 0 ...
    for method in methods:
        engine, inputs = _runner_args([B], 8, method).create_config(world_size=1)
        from xfuser.parallel import xDiTParallel
        from xfuser.testing.tiny_pipelines import build_tiny_pipeline

        pipe = build_tiny_pipeline("pixart-sigma")
        pipe.set_progress_bar_config(disable=True)
        with xDiTParallel(pipe, engine, inputs) as runner:
            b_alone = _out(runner())
        assert _rel(both[method]["latents"][1], b_alone[0]) <= 1e-5, method
        # ... so B at index 0 is a different image: the index is part of the identity
        assert _rel(alone[method]["latents"][0], b_alone[0]) > 1e-2, method


@pytest.mark.parametrize("parallel,world", [
    (dict(data_parallel_degree=2), 2),
    (dict(use_cfg_parallel=True), 2),
], ids=["dp2", "cfg2"])
def test_parallel_batch_equals_one_process_batch(parallel, world):
    """DP 2 / CFG 2 on [A, B]: every image equals the one-process batch's, with identical
    per-sample decisions on the ranks that share a forward (checked every step)."""
    methods = ["None", "Fb", "Fast"]
    reference = _runner_worker(0, 1, [A, B], {}, methods)
    run = run_on_ranks(_runner_worker, world, [A, B], parallel, methods, timeout_s=240)
    for rank, result in enumerate(run.results):
        for method in methods:
            got = result[method]["latents"]
            want = reference[method]["latents"]
            if "data_parallel_degree" in parallel:  # replica r holds prompt r
                want = want[rank:rank + 1]
            assert _rel(got, want) <= 1e-5, f"rank {rank} {method}"


# ---------------------------------------------------------------------------- item 3
def test_wrapper_takes_the_step_count_from_the_schedule(tiny):
    """Steps passed positionally, or as a custom timesteps list: the last step still computes."""
    from xfuser import xFuserFastCachePipelineWrapper

    pipe, kwargs = tiny("pixart-sigma"), _kwargs("pixart-sigma")
    with xFuserFastCachePipelineWrapper(pipe) as wrapper:
        wrapper.enable_cache("Tea", cache_ratio_threshold=5.0, cache_warmup_steps=1)  # skips all it may
        wrapper(A, "", 6, generator=sample_generators(7, 1), **kwargs)  # prompt, negative, steps
        positional = wrapper.get_cache_statistics()["per_step"]
        pipe.scheduler.set_timesteps(6)
        custom = [int(t) for t in pipe.scheduler.timesteps]
        wrapper(prompt=A, timesteps=custom, generator=sample_generators(7, 1), **kwargs)
        listed = wrapper.get_cache_statistics()["per_step"]
        with pytest.raises(ValueError, match="at least one step"):
            wrapper(prompt=A, num_inference_steps=0, **kwargs)
    for per_step in (positional, listed):
        assert len(per_step) == 6
        assert per_step[-1]["actions"] == "CCCC", "the last step was not computed"
        assert any(set(s["actions"]) == {"R"} for s in per_step), "nothing was skipped: vacuous"


# ---------------------------------------------------------------------------- item 5
def test_close_hands_the_pipeline_on(tiny):
    """A second holder is refused with the fix in the message; after close() it works, and the
    pipeline computes exactly what it computed before it was ever wrapped."""
    from xfuser import xFuserFastCachePipelineWrapper
    from xfuser.config.config import ConfigError
    from xfuser.parallel import xDiTParallel

    pipe, kwargs = tiny("pixart-sigma"), _kwargs("pixart-sigma")

    def plain():
        return _out(pipe(prompt=A, num_inference_steps=4, generator=sample_generators(7, 1), **kwargs))

    before = plain()
    wrapper = xFuserFastCachePipelineWrapper(pipe).enable_cache("Fb", cache_ratio_threshold=0.6)
    engine, inputs = _runner_args([A], 7, "Fb").create_config(world_size=1)
    with pytest.raises(ConfigError, match=r"close\(\)"):
        xDiTParallel(pipe, engine, inputs)
    wrapper.close()
    with xDiTParallel(pipe, engine, inputs) as runner:
        runner()
        with pytest.raises(ConfigError, match=r"close\(\)"):
            xFuserFastCachePipelineWrapper(pipe).enable_cache("Fast")
    assert torch.equal(plain(), before)
