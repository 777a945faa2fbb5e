"""Patch-aware schedulers for PipeFusion's cross-step overlap.

When the patch pipeline overlaps denoising steps, the last stage steps each latent patch as
soon as its noise prediction is ready (stage 0 then starts the next step on that patch), so
every patch needs a scheduler of its own whose multistep history (DPM-Solver's previous model
outputs) holds that patch's rows only. A patch scheduler is a deep copy of the pipeline's
scheduler, taken after the synchronous warm-up steps, in which every state tensor shaped like
the full latents is replaced by the patch's rows.

That is exact only for schedulers whose update is elementwise in the latents given that
history, and that draw no noise: DPMSolverMultistep (ODE solvers), FlowMatchEulerDiscrete
(deterministic sampling) and DDIM (eta = 0), with dynamic thresholding off (its quantile spans
the whole image). A stochastic step (DDPM, SDE solvers, DDIM with eta > 0) would draw its
noise patch by patch, a different sample than the full-image draw of one process; schedulers
that rescale the model input per step (``scale_model_input`` is not the identity, e.g. Euler
discrete) are out too, since stage 0 builds a patch's model input from the latents alone.
For those, the patch pipeline drains every step (exact same semantics, less overlap).
"""
from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

import torch

PATCH_AWARE = ("DPMSolverMultistepScheduler", "FlowMatchEulerDiscreteScheduler", "DDIMScheduler")


def not_patch_aware_reason(scheduler: Any, step_kwargs: dict[str, Any] | None = None) -> str | None:
    """Why ``scheduler`` (stepped with ``step_kwargs``) cannot be stepped patch by patch, or None."""
    name, config = type(scheduler).__name__, scheduler.config
    if name not in PATCH_AWARE:
        return f"{name} has no patch-aware form (patch-aware: {', '.join(PATCH_AWARE)})"
    if getattr(config, "thresholding", False):
        return f"{name} with thresholding=True takes a quantile over the whole image"
    if str(getattr(config, "algorithm_type", "")).startswith("sde") or getattr(config, "stochastic_sampling", False):
        return f"{name} draws noise every step"
    if (step_kwargs or {}).get("eta", 0.0):
        return f"{name} with eta > 0 draws noise every step"
    return None


def _map_state(value: Any, shape: torch.Size, select: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if torch.is_tensor(value) and value.shape == shape:
        return select(value).clone()
    if isinstance(value, list):
        return [_map_state(v, shape, select) for v in value]
    if isinstance(value, tuple):
        return tuple(_map_state(v, shape, select) for v in value)
    return value


def patch_scheduler(scheduler: Any, latent_shape: torch.Size, select: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """A copy of ``scheduler`` (in mid-generation) whose latent-shaped state is ``select``-ed
    down to one patch; step it with that patch's model output and latents."""
    state = {k: v for k, v in vars(scheduler).items() if k != "step"}  # an installed override stays behind
    patch = copy.copy(scheduler)
    patch.__dict__ = {k: _map_state(v, latent_shape, select) for k, v in copy.deepcopy(state).items()}
    return patch


class StepOverride:
    """Replaces ``scheduler.step`` on the instance for the duration of one generation: while
    ``active()`` is true the call is answered by ``handler(sample)`` (the patch pipeline has
    already stepped every patch), otherwise by the scheduler's own step."""

    def __init__(self, scheduler: Any, active: Callable[[], bool], handler: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.scheduler = scheduler
        self.original = type(scheduler).step.__get__(scheduler)
        self.active = active
        self.handler = handler

    def __enter__(self) -> "StepOverride":
        # wraps(): pipelines inspect ``scheduler.step``'s parameters to decide whether to pass
        # ``generator``/``eta``; the override must show the scheduler's own signature
        @functools.wraps(self.original)
        def step(*args: Any, **kwargs: Any):
            return self._step(*args, **kwargs)

        self.scheduler.step = step
        return self

    def __exit__(self, *exc: Any) -> None:
        self.scheduler.__dict__.pop("step", None)

    def _step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, return_dict: bool = True, **kwargs: Any):
        if not self.active():
            return self.original(model_output, timestep, sample, *args, return_dict=return_dict, **kwargs)
        latents = self.handler(sample)
        if not return_dict:
            return (latents,)
        from diffusers.schedulers.scheduling_utils import SchedulerOutput

        return SchedulerOutput(prev_sample=latents)
