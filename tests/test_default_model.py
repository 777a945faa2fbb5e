"""The embedded default model (assets/models/xfuser-shapes-pixart) loads offline and follows prompts.

The pixel checker (xfuser.testing.shapes.check_image) reads background colour, shape colour and
position from each generated image. Measured on the shipped weights (20 steps, guidance 2.0,
seeds 0..11, the 12 training combinations below): 10 of 12 prompts correct on all three,
background colour and position on all 12. The issue asks for >= 80% on training combinations.
"""
import importlib.util
import os

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(REPO, "assets", "models", "xfuser-shapes-pixart")

pytestmark = pytest.mark.skipif(not os.path.isdir(MODEL), reason="default model not present")


def _shapes():
    try:
        from xfuser.testing import shapes
        return shapes
    except Exception:  # keep the test independent of the rest of the package
        spec = importlib.util.spec_from_file_location("_shapes", os.path.join(REPO, "xfuser", "testing", "shapes.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod


# 12 training combinations covering every colour, shape and position.
PROMPTS = [
    "a red circle on a blue background, center",
    "a green square on a white background, top left",
    "a blue triangle on a yellow background, bottom right",
    "a yellow square on a black background, top right",
    "a white circle on a red background, bottom left",
    "a black triangle on a green background, center",
    "a red square on a white background, bottom right",
    "a green circle on a black background, top right",
    "a blue square on a red background, bottom left",
    "a yellow triangle on a blue background, top left",
    "a white triangle on a black background, top right",
    "a black circle on a yellow background, bottom left",
]
STEPS, GUIDANCE, SIZE = 20, 2.0, 64
ADHERENCE_THRESHOLD = 0.8  # the target; measured 10/12 = 0.83 (deterministic on CPU)


@pytest.fixture(scope="module")
def pipe():
    from diffusers import PixArtSigmaPipeline

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    p = PixArtSigmaPipeline.from_pretrained(MODEL, dtype=torch.float32)
    p.set_progress_bar_config(disable=True)
    return p


def _gen(pipe, prompt, seed, output_type="pil"):
    return pipe(prompt, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                use_resolution_binning=False, generator=torch.Generator().manual_seed(seed),
                output_type=output_type).images[0]


def test_config_and_generic_loader():
    from diffusers import DiffusionPipeline

    p = DiffusionPipeline.from_pretrained(MODEL)
    assert type(p).__name__ == "PixArtSigmaPipeline"
    cfg = p.transformer.config
    assert cfg.num_layers >= 8
    assert (cfg.sample_size // cfg.patch_size) ** 2 >= 64
    assert type(p.scheduler).__name__ == "DPMSolverMultistepScheduler"
    S = _shapes()
    for p_ in PROMPTS:
        assert not S.is_heldout(p_)


@pytest.fixture(scope="module")
def results(pipe):
    S = _shapes()
    out = []
    for i, prompt in enumerate(PROMPTS):
        img = _gen(pipe, prompt, seed=i)
        assert img.size == (SIZE, SIZE)
        out.append(S.check_image(img, prompt))
    return out


def test_prompt_adherence_on_training_combinations(results):
    """Background colour, shape colour and position all right for >= 80% of the prompts."""
    rate = float(np.mean([r["ok"] for r in results]))
    failed = [(p, {k: v for k, v in r.items() if k.endswith("_ok") and not v}) for p, r in zip(PROMPTS, results)
              if not r["ok"]]
    assert rate >= ADHERENCE_THRESHOLD, f"adherence {rate:.2f}; failures: {failed}"
    assert all(r["bg_ok"] for r in results), "every background colour should follow the prompt"


def test_same_seed_is_deterministic(pipe):
    a = _gen(pipe, PROMPTS[0], seed=123, output_type="np")
    b = _gen(pipe, PROMPTS[0], seed=123, output_type="np")
    np.testing.assert_array_equal(a, b)


def test_fast_extrapolation_beats_reuse_on_the_trained_model(pipe):
    """On identical decisions (one skip at a time), FastCache's residual forecast stays closer
    to the uncached image than residual reuse. On random-weight models it need not (their
    residuals are not smooth in t), which is why this is checked on the trained model."""
    from xfuser import xFuserFastCachePipelineWrapper
    from xfuser.metrics import psnr

    prompt = "a red circle on a blue background, top left"
    reference = _gen(pipe, prompt, 0)
    wrapper = xFuserFastCachePipelineWrapper(pipe)
    quality, logs = {}, []
    try:
        for approximation in ("reuse", "extrapolate"):
            wrapper.enable_cache("Fast", cache_ratio_threshold=5.0, motion_threshold=0.0, max_cached_steps=1,
                                 approximation=approximation)
            image = _gen(wrapper, prompt, 0)
            logs.append([s["actions"] for s in wrapper.get_cache_statistics()["per_step"]])
            quality[approximation] = psnr(image, reference)
    finally:
        wrapper.disable_cache()
    assert logs[0] == logs[1] and sum("R" in a for a in logs[0]) >= 8
    assert quality["extrapolate"] > quality["reuse"] + 3.0, quality
