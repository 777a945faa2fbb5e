"""Patch schedulers (PipeFusion's cross-step overlap): stepping every latent patch with its own
copy of the scheduler, from the middle of a generation, equals stepping the full latents."""
from __future__ import annotations

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)

from xfuser.model_executor.models.pipefusion import latent_rows
from xfuser.model_executor.schedulers.patch_scheduler import StepOverride, not_patch_aware_reason, patch_scheduler

SCHEDULERS = {
    "dpm++2m": lambda: DPMSolverMultistepScheduler(solver_order=2),
    "dpm++3m-v": lambda: DPMSolverMultistepScheduler(solver_order=3, prediction_type="v_prediction"),
    "flow-euler": lambda: FlowMatchEulerDiscreteScheduler(shift=3.0),
    "ddim": lambda: DDIMScheduler(),
}


def _model(x: torch.Tensor, t) -> torch.Tensor:
    """A stand-in model output that depends on the sample and the step (elementwise)."""
    return torch.tanh(x) * (0.5 + float(t) / 2000.0) + 0.1 * x


@pytest.mark.parametrize("name", list(SCHEDULERS))
@pytest.mark.parametrize("shape", [(2, 4, 8, 6), (1, 24, 16)])  # (B, C, H, W) latents; Flux's packed tokens
def test_per_patch_steps_equal_full_steps(name, shape):
    steps, warm, patches = 8, 2, 3
    n_tokens = 24 if len(shape) == 3 else 12  # token rows: 4 rows of 3 tokens (H=8 with patch size 2)
    x0 = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    full = SCHEDULERS[name]()
    full.set_timesteps(steps)
    x = x0.clone()
    for t in full.timesteps[:warm]:
        x = full.step(_model(x, t), t, x, return_dict=False)[0]
    bounds = [(p * n_tokens // patches, (p + 1) * n_tokens // patches) for p in range(patches)]
    per_patch = [patch_scheduler(full, x.shape, lambda v, s=s, e=e: latent_rows(v, s, e, n_tokens)) for s, e in bounds]
    y = x.clone()
    for t in full.timesteps[warm:]:
        x = full.step(_model(x, t), t, x, return_dict=False)[0]
        for sched, (s, e) in zip(reversed(per_patch), reversed(bounds)):  # any patch order
            rows = latent_rows(y, s, e, n_tokens)
            rows.copy_(sched.step(_model(rows, t), t, rows, return_dict=False)[0])
    torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(x, x0)


def test_patch_copy_leaves_the_pipeline_scheduler_alone():
    full = DPMSolverMultistepScheduler()
    full.set_timesteps(6)
    x = torch.randn(1, 4, 8, 8)
    for t in full.timesteps[:2]:
        x = full.step(_model(x, t), t, x, return_dict=False)[0]
    before = [m.clone() for m in full.model_outputs if m is not None]
    patch = patch_scheduler(full, x.shape, lambda v: v[..., :4, :])
    assert all(m.shape[-2] == 4 for m in patch.model_outputs if m is not None)
    patch.step(torch.zeros(1, 4, 4, 8), full.timesteps[2], x[..., :4, :])
    assert full.step_index == 2 and patch.step_index == 3
    for m, b in zip((m for m in full.model_outputs if m is not None), before):
        torch.testing.assert_close(m, b)


def test_schedulers_that_are_not_patch_aware_say_why():
    assert not_patch_aware_reason(DPMSolverMultistepScheduler()) is None
    assert "EulerDiscreteScheduler has no patch-aware form" in not_patch_aware_reason(EulerDiscreteScheduler())
    assert "thresholding" in not_patch_aware_reason(DDIMScheduler(thresholding=True))
    assert "draws noise" in not_patch_aware_reason(DDIMScheduler(), {"eta": 0.5})
    assert "draws noise" in not_patch_aware_reason(DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"))
    from diffusers import DDPMScheduler

    assert "DDPMScheduler has no patch-aware form" in not_patch_aware_reason(DDPMScheduler())


def test_step_override_answers_only_while_active_and_is_removed():
    sched = DDIMScheduler()
    sched.set_timesteps(4)
    x = torch.ones(1, 4, 2, 2)
    state = {"on": False}
    with StepOverride(sched, lambda: state["on"], lambda sample: sample * 0 + 7):
        real = sched.step(x, sched.timesteps[0], x, return_dict=False)[0]
        state["on"] = True
        assert torch.equal(sched.step(x, sched.timesteps[1], x, return_dict=False)[0], torch.full_like(x, 7))
        assert torch.equal(sched.step(x, sched.timesteps[1], x).prev_sample, torch.full_like(x, 7))
        copy = patch_scheduler(sched, x.shape, lambda v: v)
        assert "step" not in vars(copy)  # the override is not copied into patch schedulers
    assert "step" not in vars(sched)
    assert not torch.equal(real, torch.full_like(x, 7))


def test_step_override_keeps_the_signature_pipelines_inspect():
    import inspect

    from diffusers import DDPMScheduler

    sched = DDPMScheduler()
    with StepOverride(sched, lambda: False, lambda sample: sample):
        assert "generator" in inspect.signature(sched.step).parameters  # else DDPM's noise ignores the seed
