"""Cache methods on a transformer driven step by step along a smooth synthetic trajectory.

The trajectory x_t = x_0 + drift(t) makes hidden states change a little per step, as in a
trained model, so hit ratios, knobs and approximations have something to act on.
"""
from __future__ import annotations

import math

import pytest
import torch
from diffusers import PixArtTransformer2DModel

from xfuser.config import CacheConfig
from xfuser.model_executor.cache import CacheManager
from xfuser.model_executor.cache.adapters.base import adapter_for
from xfuser.model_executor.cache.linear_approx import RidgeResidualMap
from xfuser.model_executor.cache.sync import SyncGroup

STEPS = 10


def tiny_pixart(seed: int = 0, dtype=torch.float32) -> PixArtTransformer2DModel:
    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(
        sample_size=8, num_layers=4, attention_head_dim=16, num_attention_heads=4, in_channels=4,
        out_channels=8, patch_size=2, cross_attention_dim=64, caption_channels=32,
        norm_type="ada_norm_single", use_additional_conditions=False,
    )
    return model.eval().to(dtype)


def trajectory(model, steps: int = STEPS, speed: float = 0.05, seed: int = 1, local: bool = False):
    """Run ``model`` over a smooth input trajectory; returns outputs per step."""
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    x0 = torch.randn(2, 4, 8, 8, generator=g)
    v = torch.randn(2, 4, 8, 8, generator=g)
    if local:  # only the top-left quarter moves: static background tokens exist
        mask = torch.zeros(1, 1, 8, 8)
        mask[..., :4, :4] = 1.0
        v = v * mask * 4
    enc = torch.randn(2, 5, 32, generator=g)
    outs = []
    for i in range(steps):
        t = 999 - i * (999 // steps)
        x = (x0 + speed * i * v).to(dtype)
        with torch.no_grad():
            out = model(
                x, encoder_hidden_states=enc.to(dtype), timestep=torch.tensor([t, t]),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False,
            )[0]
        outs.append(out.float())
    return outs


def run_with(model, steps=STEPS, speed=0.05, local=False, **cfg):
    cfg.setdefault("cache_warmup_steps", 1)
    manager = CacheManager(model, CacheConfig(**cfg)).install()
    try:
        manager.reset(steps)
        outs = trajectory(model, steps, speed, local=local)
        return outs, manager.statistics()
    finally:
        manager.uninstall()


def rel_err(outs, refs) -> float:
    return max(((a - b).norm() / b.norm()).item() for a, b in zip(outs, refs))


@pytest.fixture(scope="module")
def model():
    return tiny_pixart()


@pytest.fixture(scope="module")
def reference(model):
    return trajectory(model)


@pytest.mark.parametrize("method", ["None", "Fb", "Tea", "Fast"])
def test_threshold_zero_reproduces_uncached(model, reference, method):
    outs, stats = run_with(model, method=method, cache_ratio_threshold=0.0, motion_threshold=0.0)
    assert rel_err(outs, reference) <= 1e-6
    assert stats["hit_ratio"] == 0.0


@pytest.mark.parametrize("method", ["Fb", "Tea", "Fast"])
def test_hit_ratio_monotone_in_threshold(model, method):
    ratios = []
    for thr in (0.0, 0.02, 0.05, 0.1, 0.2, 0.4, 0.8):
        _, stats = run_with(model, method=method, cache_ratio_threshold=thr, motion_threshold=0.0)
        ratios.append(stats["hit_ratio"])
    assert ratios == sorted(ratios), ratios
    assert ratios[0] == 0.0 and ratios[-1] > 0.3, ratios


def test_guards_first_warmup_and_last_step_compute(model):
    _, stats = run_with(model, method="Fast", cache_ratio_threshold=10.0, motion_threshold=0.0, cache_warmup_steps=2)
    actions = [s["actions"] for s in stats["per_step"]]
    assert actions[0] == actions[1] == actions[-1] == "CCCC"
    assert all(a != "CCCC" for a in actions[2:-1])


def test_max_cached_steps_caps_consecutive_reuse(model):
    _, stats = run_with(model, method="Fb", cache_ratio_threshold=10.0, max_cached_steps=2)
    actions = [s["actions"] for s in stats["per_step"]]
    run = longest = 0
    for a in actions:
        run = run + 1 if a != "CCCC" else 0
        longest = max(longest, run)
    assert longest == 2, actions


def test_fb_hit_is_exact_when_inputs_repeat(model):
    """Same input at every step: block 0 reproduces itself, the hit returns the computed output."""
    config = CacheConfig(method="Fb", cache_ratio_threshold=0.01, cache_warmup_steps=1)
    manager = CacheManager(model, config).install()
    try:
        manager.reset(4)
        x = torch.randn(1, 4, 8, 8)
        enc = torch.randn(1, 5, 32)
        outs = []
        for _ in range(4):
            with torch.no_grad():
                outs.append(model(x, encoder_hidden_states=enc, timestep=torch.tensor([500]),
                                  added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0])
        actions = [s["actions"] for s in manager.statistics()["per_step"]]
    finally:
        manager.uninstall()
    assert actions[1] == actions[2] == "CRRR"
    assert torch.equal(outs[1], outs[0]) and torch.equal(outs[2], outs[0])


def _decisions(stats):
    return [s["actions"] for s in stats["per_step"]], [s["token_fraction"] for s in stats["per_step"]]


def test_every_fast_knob_changes_decisions(model):
    base = dict(method="Fast", cache_ratio_threshold=0.12, motion_threshold=0.0)
    _, ref = run_with(model, **base)
    variants = {
        "significance_level": dict(significance_level=0.45),
        "beta0": dict(betas=(0.002, 0.5, -0.002, 0.00005)),
        "beta1": dict(betas=(0.01, 500.0, -0.002, 0.00005)),
        "beta2": dict(betas=(0.01, 0.5, -0.02, 0.00005)),
        "beta3": dict(betas=(0.01, 0.5, -0.002, 0.02)),
    }
    for name, change in variants.items():
        _, stats = run_with(model, **{**base, **change})
        assert _decisions(stats) != _decisions(ref), f"{name} did not change any decision"
    # motion_threshold: token reduction on a trajectory where only one region moves
    _, no_motion = run_with(model, method="Fast", cache_ratio_threshold=0.01, motion_threshold=0.0, local=True)
    _, motion = run_with(model, method="Fast", cache_ratio_threshold=0.01, motion_threshold=0.5, local=True)
    assert any("P" in a for a in _decisions(motion)[0]), _decisions(motion)[0]
    assert _decisions(motion) != _decisions(no_motion)
    assert motion["compute_fraction"] < no_motion["compute_fraction"]


def test_chi2_bound_depends_on_significance_and_tokens():
    from xfuser.model_executor.cache.methods.fast import chi2_bound_factor

    assert chi2_bound_factor(0.01, 64) > chi2_bound_factor(0.05, 64) > chi2_bound_factor(0.3, 64) > 1.0
    # more tokens -> tighter test (the fork's bound ~1 came from ignoring this)
    assert chi2_bound_factor(0.05, 16) > chi2_bound_factor(0.05, 4096) > 1.0
    assert math.isclose(chi2_bound_factor(0.5, 10**6), 1.0, abs_tol=1e-3)


def test_fitted_map_beats_identity_and_random_on_held_out_steps():
    """Fit ΔR ≈ ΔX·A on a real block's computed steps, test on the next (held-out) step."""
    model = tiny_pixart(3)
    block = model.transformer_blocks[1]
    adapter = adapter_for(model)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 16, 64, generator=g)
    v = torch.randn(2, 16, 64, generator=g) * 0.3
    temb = torch.randn(2, 6 * 64, generator=g) * 0.1
    enc = torch.randn(2, 5, 64, generator=g)

    def residual(x):
        with torch.no_grad():
            call = adapter.bind(block, (x,), dict(encoder_hidden_states=enc, timestep=temb))
            return call.run() - x

    xs = [x0 + v * (i + 0.1 * i * i) for i in range(8)]
    rs = [residual(x) for x in xs]
    fit = RidgeResidualMap(ridge=1e-3)
    for i in range(1, 7):
        fit.observe(xs[i] - xs[i - 1], rs[i] - rs[i - 1])
    fit.solve(SyncGroup())
    dx, dr = xs[7] - xs[6], rs[7] - rs[6]
    err_fit = (fit.correction(dx) - dr).norm() / dr.norm()
    err_reuse = dr.norm() / dr.norm()  # A = 0: plain residual reuse
    err_identity_w = (dx - dr).norm() / dr.norm()  # W = I on the residual: "output = input + Δ"
    err_random = (dx @ (torch.randn(64, 64, generator=g) / 8) - dr).norm() / dr.norm()
    assert err_fit < 0.8 * err_reuse, (err_fit, err_reuse)
    assert err_fit < err_identity_w and err_fit < err_random


def test_fast_reports_held_out_errors_and_picks_the_better(model):
    _, stats = run_with(model, method="Fast", cache_ratio_threshold=0.3, motion_threshold=0.0, max_cached_steps=1, steps=12, approximation="auto")
    entries = [b["approximation"] for b in stats["per_block"] if "approximation" in b]
    assert entries, "no block was evaluated on a held-out step"
    for e in entries:
        better = "fitted" if e["fitted_rel_error"] < e["reuse_rel_error"] else "reuse"
        assert e["chosen"] == better


def test_token_subset_matches_full_block_and_attends_to_all_tokens():
    model = tiny_pixart(5)
    block = model.transformer_blocks[0]
    adapter = adapter_for(model)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 64, generator=g)
    kw = dict(encoder_hidden_states=torch.randn(1, 5, 64, generator=g), timestep=torch.randn(1, 6 * 64, generator=g) * 0.1)
    with torch.no_grad():
        full = adapter.bind(block, (x,), kw).run()
        everything = adapter.run_token_subset(adapter.bind(block, (x,), kw), torch.arange(16))[0]
        torch.testing.assert_close(everything, full, rtol=1e-5, atol=1e-5)
        motion = torch.tensor([0, 5, 9])
        sub = adapter.run_token_subset(adapter.bind(block, (x,), kw), motion)[0]
        torch.testing.assert_close(sub[:, motion], full[:, motion], rtol=1e-5, atol=1e-5)
        x2 = x.clone()
        x2[:, 12] += torch.randn(64, generator=g)  # a static token's key/value changes ...
        sub2 = adapter.run_token_subset(adapter.bind(block, (x2,), kw), motion)[0]
    assert (sub2[:, motion] - sub[:, motion]).abs().max() > 1e-4  # ... and motion tokens see it


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["Fb", "Tea", "Fast"])
def test_methods_run_in_fp32_and_bf16(method, dtype):
    model = tiny_pixart(7, dtype)
    outs, stats = run_with(model, method=method, cache_ratio_threshold=0.2, motion_threshold=0.5, local=True, steps=6)
    assert all(o.isfinite().all() for o in outs)
    assert stats["hit_ratio"] > 0


def test_extrapolation_is_exact_for_a_residual_linear_in_time():
    """A block whose residual is a + b·t is forecast exactly from two computed steps."""
    from xfuser.model_executor.cache.methods.fast import FastCache

    class LinearInTime(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.t = 0.0
            self.a, self.b = torch.randn(1, 4, 8), torch.randn(1, 4, 8)

        def forward(self, hidden_states):
            return hidden_states + self.a + self.b * self.t

    class Stack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer_blocks = torch.nn.ModuleList([LinearInTime()])

    from xfuser.model_executor.cache.adapters.base import BlockAdapter

    stack = Stack()
    manager = CacheManager(stack, CacheConfig(method="Fast", cache_ratio_threshold=10.0, motion_threshold=0.0,
                                              cache_warmup_steps=2, approximation="extrapolate"),
                           adapter=BlockAdapter()).install()
    assert isinstance(manager.method, FastCache)
    manager.auto_step = False
    manager.reset(6)
    x = torch.randn(1, 4, 8)
    block = stack.transformer_blocks[0]
    actions = []
    for step, t in enumerate([1.0, 0.8, 0.6, 0.4, 0.2, 0.0]):
        manager.begin_step(t)
        block.block.t = t  # the installed CachedBlock wraps the real block
        got = block(x)
        actions.append("".join(manager.stats.steps[-1]["actions"]))
        torch.testing.assert_close(got, x + block.block.a + block.block.b * t, rtol=1e-5, atol=1e-5)
    assert "R" in actions, actions


def test_cogvideox_variants_get_their_published_teacache_polynomials():
    """TeaCache publishes one polynomial per CogVideoX variant; the adapter picks by config."""
    from types import SimpleNamespace

    from xfuser.model_executor.cache.adapters.cogvideox import CogVideoXAdapter, ConsisIDAdapter

    def model(**cfg):
        base = dict(patch_size_t=None, in_channels=16, num_attention_heads=48, attention_head_dim=64)
        return SimpleNamespace(config=SimpleNamespace(**{**base, **cfg}))

    a = CogVideoXAdapter()
    assert a.tea_coefficients_for(model())[0] == -1.53880483e03  # 5b
    assert a.tea_coefficients_for(model(num_attention_heads=30))[0] == -3.10658903e01  # 2b
    assert a.tea_coefficients_for(model(patch_size_t=2))[0] == 2.50210439e02  # 1.5 t2v
    assert a.tea_coefficients_for(model(patch_size_t=2, in_channels=32))[0] == 1.22842302e02  # 1.5 i2v
    assert ConsisIDAdapter().tea_coefficients_for(model(patch_size_t=2))[0] == -1.53880483e03


def test_method_registry_and_config_names_are_one_list():
    """config.CACHE_METHODS (torch-free, what the CLI validates) and the method classes agree, so
    a name the config accepts always has a class, and an unknown one fails with the flag."""
    from xfuser.config.config import CACHE_METHODS, ConfigError
    from xfuser.model_executor.cache.methods import METHODS, method_class

    assert tuple(METHODS) == CACHE_METHODS
    for name in CACHE_METHODS:
        assert method_class(name.upper()) is METHODS[name]
    with pytest.raises(ConfigError, match="--cache_method"):
        method_class("Magic")
