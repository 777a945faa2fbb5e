"""The cache wrapper on real (tiny, random-weight) diffusers pipelines of every family."""
from __future__ import annotations

import math

import pytest
import torch

from xfuser import ConfigError, xFuserFastCachePipelineWrapper
from xfuser.testing.tiny_pipelines import TINY_MODEL_TYPES, build_tiny_pipeline, tiny_call_kwargs

STEPS = 4


def _call(wrapper, model_type, steps=STEPS, **overrides):
    kwargs = tiny_call_kwargs(model_type)
    kwargs.update(num_inference_steps=steps, output_type="latent")
    kwargs.update(overrides)
    out = wrapper(**kwargs)
    return out[0] if isinstance(out, tuple) else (out.images if hasattr(out, "images") else out.frames)


@pytest.fixture(scope="module", params=TINY_MODEL_TYPES)
def family(request):
    pipe = build_tiny_pipeline(request.param)
    pipe.set_progress_bar_config(disable=True)
    wrapper = xFuserFastCachePipelineWrapper(pipe)
    reference = _call(wrapper, request.param)
    return request.param, wrapper, reference


@pytest.mark.parametrize("method", ["None", "Fb", "Tea", "Fast"])
def test_threshold_zero_reproduces_uncached_on_every_family(family, method):
    model_type, wrapper, reference = family
    wrapper.enable_cache(method, cache_ratio_threshold=0.0, motion_threshold=0.0)
    try:
        out = _call(wrapper, model_type)
        stats = wrapper.get_cache_statistics()
    finally:
        wrapper.disable_cache()
    assert ((out - reference).norm() / reference.norm()).item() <= 1e-6
    assert stats["num_steps"] == STEPS and stats["hit_ratio"] == 0.0


@pytest.mark.parametrize("method", ["Fb", "Tea", "Fast"])
def test_every_method_caches_on_every_family(family, method):
    model_type, wrapper, reference = family
    wrapper.enable_cache(method, cache_ratio_threshold=5.0, motion_threshold=0.5)
    try:
        out = _call(wrapper, model_type, steps=5)
        stats = wrapper.get_cache_statistics()
    finally:
        wrapper.disable_cache()
    assert torch.isfinite(out).all()
    assert stats["hit_ratio"] > 0, [s["actions"] for s in stats["per_step"]]
    assert stats["per_step"][0]["actions"] == "C" * stats["num_blocks"]
    assert stats["per_step"][-1]["actions"] == "C" * stats["num_blocks"]


def test_two_identical_calls_give_identical_images_and_fresh_statistics():
    pipe = build_tiny_pipeline("pixart-sigma")
    pipe.set_progress_bar_config(disable=True)
    wrapper = xFuserFastCachePipelineWrapper(pipe).enable_fastcache(cache_ratio_threshold=0.3, motion_threshold=0.3)
    first = _call(wrapper, "pixart-sigma", steps=6)
    stats1 = wrapper.get_cache_statistics()
    second = _call(wrapper, "pixart-sigma", steps=6)
    stats2 = wrapper.get_cache_statistics()
    assert torch.equal(first, second)
    # everything but the measured peak memory (the process's RSS moves by a page or two)
    stats1.pop("peak_memory"), stats2.pop("peak_memory")
    assert stats1 == stats2 and stats2["num_steps"] == 6
    # a shorter call after a longer one: statistics describe only the last call
    _call(wrapper, "pixart-sigma", steps=3)
    assert wrapper.get_cache_statistics()["num_steps"] == 3


def test_batch_of_prompts_and_cfg_batch():
    pipe = build_tiny_pipeline("pixart-sigma")
    pipe.set_progress_bar_config(disable=True)
    wrapper = xFuserFastCachePipelineWrapper(pipe)
    kwargs = tiny_call_kwargs("pixart-sigma")
    prompt = kwargs.pop("prompt")
    ref = _call(wrapper, "pixart-sigma", prompt=[prompt, "a blue square"], guidance_scale=3.0)
    wrapper.enable_cache("Fb", cache_ratio_threshold=0.0)
    out = _call(wrapper, "pixart-sigma", prompt=[prompt, "a blue square"], guidance_scale=3.0)
    assert out.shape[0] == 2 and torch.allclose(out, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        (dict(cache_ratio_threshold=-1.0), "--cache_ratio_threshold"),
        (dict(cache_ratio_threshold=math.nan), "--cache_ratio_threshold"),
        (dict(motion_threshold=-0.5), "--motion_threshold"),
        (dict(significance_level=2.0), "--significance_level"),
        (dict(method="Slow"), "--cache_method"),
    ],
)
def test_bad_parameters_fail_before_compute(kwargs, fragment):
    pipe = build_tiny_pipeline("pixart-sigma")
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    wrapper = xFuserFastCachePipelineWrapper(pipe)
    method = kwargs.pop("method", "Fast")
    with pytest.raises(ConfigError, match=fragment):
        wrapper.enable_cache(method, **kwargs)
    assert wrapper.manager is None and not calls


def test_unsupported_model_is_rejected():
    class NotADiT(torch.nn.Module):
        pass

    class FakePipe:
        transformer = NotADiT()

    with pytest.raises(ConfigError, match="no cache adapter for NotADiT"):
        xFuserFastCachePipelineWrapper(FakePipe()).enable_cache("Fb")


def test_disable_restores_the_original_blocks():
    pipe = build_tiny_pipeline("flux")
    before = [type(b) for b in pipe.transformer.transformer_blocks]
    keys = set(pipe.transformer.state_dict())
    wrapper = xFuserFastCachePipelineWrapper(pipe).enable_cache("Tea")
    assert all(type(b).__name__ == "CachedBlock" for b in pipe.transformer.transformer_blocks)
    wrapper.disable_cache()
    assert [type(b) for b in pipe.transformer.transformer_blocks] == before
    assert set(pipe.transformer.state_dict()) == keys
