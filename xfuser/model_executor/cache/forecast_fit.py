"""Fit FastCache's learned forecast (forecast.py) from uncached generations.

1. :func:`record_trajectories` runs the pipeline without caching on calibration prompts and
   keeps, for every block and step, the block's input and residual on a fixed subset of at
   most ``max_tokens`` token rows per stream (memory stays bounded at any resolution).
2. :func:`fit_forecast` builds, for every block l, step t, gap g and trend flag, the samples
   the runtime would see — last compute at b = t − g, the one before at a = b − h for every
   h ≤ G — and solves the per-group normal equations of R_t ≈ α R_b [+ β (g/h)(R_b − R_a)]
   [+ γ (H_t − H_b)] in closed form (float64, ridge towards reuse), then measures the
   forecast's relative output error and the block's input change on the same samples.
   The default fits α alone: β and γ lower the open-loop error on held-out prompts but raise
   the error of a whole cached generation, where the forecast's own errors feed later steps
   (measured: docs/methods/fastcache.md).
Everything is deterministic: the same prompts, seeds and steps give the same file.
"""
from __future__ import annotations

from typing import Any

import torch

from xfuser.logger import init_logger
from xfuser.model_executor.cache.adapters.base import adapter_for
from xfuser.model_executor.cache.forecast import FEATURES, VERSION, LearnedForecast, stream_widths

logger = init_logger(__name__)


class _BlockRecorder:
    """Forward hooks on every block: per step, (input, residual) of each stream, token-subsampled."""

    def __init__(self, transformer, max_tokens: int) -> None:
        self.adapter = adapter_for(transformer)
        self.max_tokens = max_tokens
        self.blocks = [block for _, block in self.adapter.iter_blocks(transformer)]
        self.inputs: list[list[list[torch.Tensor]]] = [[] for _ in self.blocks]  # [block][step][stream]
        self.residuals: list[list[list[torch.Tensor]]] = [[] for _ in self.blocks]
        self._pending: dict[int, list[torch.Tensor]] = {}
        self.handles = []
        for i, block in enumerate(self.blocks):
            self.handles.append(block.register_forward_pre_hook(self._pre(i), with_kwargs=True))
            self.handles.append(block.register_forward_hook(self._post(i)))

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        if t.ndim != 3 or t.shape[1] <= self.max_tokens:
            return t
        stride = -(-t.shape[1] // self.max_tokens)
        return t[:, ::stride]

    def _pre(self, index: int):
        def hook(module, args, kwargs):
            call = self.adapter.bind(module, args, kwargs)
            self._pending[index] = [s.detach() for s in call.streams]

        return hook

    def _post(self, index: int):
        def hook(module, args, output):
            ins = self._pending.pop(index)
            outs = self.adapter.output_streams(output)
            self.inputs[index].append([self._rows(x).float().cpu() for x in ins])
            self.residuals[index].append([self._rows(o.detach() - x).float().cpu() for o, x in zip(outs, ins)])

        return hook

    def take(self) -> dict[str, Any]:
        """One generation's trajectory: inputs/residuals [block][step][stream] (batch, rows, D)."""
        out = {"inputs": self.inputs, "residuals": self.residuals}
        self.inputs = [[] for _ in self.blocks]
        self.residuals = [[] for _ in self.blocks]
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def record_trajectories(
    pipe, prompts: list[str], num_inference_steps: int, seed: int = 0, max_tokens: int = 256, **call_kwargs: Any
) -> list[dict[str, Any]]:
    """Uncached generations, one trajectory per prompt (prompt i draws from seed + i)."""
    from xfuser.model_executor.pipelines.call_args import prepare_call_kwargs

    recorder = _BlockRecorder(pipe.transformer, max_tokens)
    trajectories = []
    try:
        for i, prompt in enumerate(prompts):
            kwargs = prepare_call_kwargs(pipe, **call_kwargs)
            generator = torch.Generator(device="cpu").manual_seed(seed + i)
            with torch.no_grad():
                pipe(prompt=prompt, num_inference_steps=num_inference_steps, generator=generator, output_type="latent", **kwargs)
            trajectory = recorder.take()
            steps = {len(s) for s in trajectory["inputs"]}
            if steps != {num_inference_steps}:
                raise RuntimeError(f"expected {num_inference_steps} calls of every block per generation, got {sorted(steps)}")
            trajectories.append(trajectory)
            logger.info("calibration prompt %d/%d recorded", i + 1, len(prompts))
    finally:
        recorder.remove()
    return trajectories


DEFAULT_FEATURES = ("residual", "trend")
DEFAULT_TREND_MAX_GAP = 2
DEFAULT_MAX_GAP = 8
#: storage of the coefficients (their values lie near 0..1; fp16 keeps ~3 significant digits, far
#: below the forecast's own error, at half the bytes)
COEF_DTYPE = torch.float16
#: per-channel coefficients while the table stays below this many values (else one per head)
MAX_PER_CHANNEL_VALUES = 4_000_000


def _stacked(trajectories, block: int, stream: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, residuals) of one block and stream: (prompts, steps, rows, D) float64."""
    ins = torch.stack([torch.stack([s[stream].reshape(-1, s[stream].shape[-1]) for s in t["inputs"][block]]) for t in trajectories])
    res = torch.stack([torch.stack([s[stream].reshape(-1, s[stream].shape[-1]) for s in t["residuals"][block]]) for t in trajectories])
    return ins.double(), res.double()


def _design(ins, res, t: int, g: int, trend: bool, max_gap: int, features: tuple[str, ...]):
    """Samples the runtime would see at step t, gap g: features (n, D, F), target, input, ref.
    With a trend, every earlier compute a = b − h (h ≤ max_gap) gives one sample."""
    b = t - g
    hs = [h for h in range(1, max_gap + 1) if b - h >= 0] if trend else [0]
    if not hs:
        return None
    r_b, x_b, x_t, r_t = res[:, b], ins[:, b], ins[:, t], res[:, t]  # (P, rows, D)
    cols = []
    for name in features:
        if name == "residual":
            cols.append(r_b.unsqueeze(1).expand(-1, len(hs), -1, -1))
        elif name == "trend":
            if trend:
                cols.append(torch.stack([(g / h) * (r_b - res[:, b - h]) for h in hs], dim=1))
            else:
                cols.append(torch.zeros_like(r_b).unsqueeze(1))
        else:
            cols.append((x_t - x_b).unsqueeze(1).expand(-1, len(hs), -1, -1))
    d = r_b.shape[-1]
    feats = torch.stack(cols, dim=-1).reshape(-1, d, len(features))

    def rep(x):
        return x.unsqueeze(1).expand(-1, len(hs), -1, -1).reshape(-1, d)

    return feats, rep(r_t), rep(x_t), rep(x_b)


def solve_grouped(
    features: torch.Tensor, target: torch.Tensor, groups: int, ridge: float, active: list[bool]
) -> torch.Tensor:
    """Least squares per channel group, shrunk towards reuse (α = 1, the rest 0):
    (features, groups). Inactive features (a trend without an earlier compute) stay at 0."""
    n, d, k = features.shape
    per = d // groups
    x = features.reshape(n, groups, per, k).permute(1, 0, 2, 3).reshape(groups, n * per, k)
    y = target.reshape(n, groups, per).permute(1, 0, 2).reshape(groups, n * per)
    gram = x.transpose(1, 2) @ x  # (groups, k, k)
    rhs = (x.transpose(1, 2) @ y.unsqueeze(-1)).squeeze(-1)
    prior = torch.zeros(k, dtype=gram.dtype)
    prior[0] = 1.0
    scale = gram.diagonal(dim1=1, dim2=2).mean(-1, keepdim=True).clamp_min(1e-30)  # (groups, 1)
    lam = ridge * scale
    eye = torch.eye(k, dtype=gram.dtype)
    coef = torch.linalg.solve(gram + lam.unsqueeze(-1) * eye, rhs + lam * prior)
    coef[:, [not a for a in active]] = 0.0
    return coef.T.contiguous()


def default_groups(heads: int, n_blocks: int, n_steps: int, max_gap: int, n_features: int, widths: list[int]) -> int:
    """One coefficient per channel when the table is small, else one per attention head."""
    values = n_blocks * n_steps * max_gap * 2 * n_features * sum(widths)
    return widths[0] if values <= MAX_PER_CHANNEL_VALUES else heads


def fit_forecast(
    trajectories: list[dict[str, Any]], transformer, max_gap: int = DEFAULT_MAX_GAP, groups: int | None = None, ridge: float = 1e-3,
    meta: dict[str, Any] | None = None, features: tuple[str, ...] = DEFAULT_FEATURES, trend_max_gap: int | None = DEFAULT_TREND_MAX_GAP,
) -> LearnedForecast:
    """Coefficients, expected errors and input changes for every (block, step, gap, trend);
    the trend is used for gaps up to ``trend_max_gap`` (default: every gap)."""
    features = tuple(f for f in FEATURES if f in features)
    if not features or features[0] != "residual":
        raise ValueError(f"features must include 'residual' (got {features}); choose from {FEATURES}")
    adapter = adapter_for(transformer)
    widths = stream_widths(transformer, adapter)
    first = trajectories[0]
    n_blocks, n_steps, n_streams = len(first["inputs"]), len(first["inputs"][0]), len(first["inputs"][0][0])
    recorded = [first["inputs"][0][0][k].shape[-1] for k in range(n_streams)]
    if recorded != widths:
        raise ValueError(f"recorded stream widths {recorded} differ from the transformer config's {widths}")
    groups = groups or default_groups(adapter.num_heads(transformer), n_blocks, n_steps, max_gap, len(features), widths)
    coef = [torch.zeros(n_blocks, n_steps, max_gap, 2, len(features), groups, dtype=COEF_DTYPE) for _ in range(n_streams)]
    for c in coef:
        c[..., 0, :] = 1.0  # reuse wherever nothing is fitted (those entries are never used: E = inf)
    error = torch.full((n_blocks, n_steps, max_gap, 2), float("inf"), dtype=torch.float64)
    delta = torch.ones(n_blocks, n_steps, max_gap, dtype=torch.float64)
    for block in range(n_blocks):
        data = [_stacked(trajectories, block, k) for k in range(n_streams)]
        for t in range(1, n_steps):
            for g in range(1, min(max_gap, t) + 1):
                for trend in (False, True):
                    if trend and ("trend" not in features or (trend_max_gap is not None and g > trend_max_gap)):  # the no-trend fit
                        for c in coef:
                            c[block, t, g - 1, 1] = c[block, t, g - 1, 0]
                        error[block, t, g - 1, 1] = error[block, t, g - 1, 0]
                        continue
                    active = [name != "trend" or trend for name in features]
                    sums = torch.zeros(4, dtype=torch.float64)  # error², output², input change², ref input²
                    for k, (ins, res) in enumerate(data):
                        design = _design(ins, res, t, g, trend, max_gap, features)
                        if design is None:
                            break
                        feats, target, x_now, x_ref = design
                        c = solve_grouped(feats, target, groups, ridge, active)
                        coef[k][block, t, g - 1, int(trend)] = c.float()
                        c = coef[k][block, t, g - 1, int(trend)].double()  # as stored: the errors are the file's
                        pred = (feats * c.T.repeat_interleave(widths[k] // groups, dim=0)).sum(-1)
                        sums += torch.stack([(pred - target).pow(2).sum(), (x_now + target).pow(2).sum(),
                                             (x_now - x_ref).pow(2).sum(), x_ref.pow(2).sum()])
                    else:
                        err2, norm2, dx2, ref2 = sums.tolist()
                        error[block, t, g - 1, int(trend)] = (err2 / max(norm2, 1e-30)) ** 0.5
                        if not trend:
                            delta[block, t, g - 1] = max((dx2 / max(ref2, 1e-30)) ** 0.5, 1e-12)
    info = {
        "transformer": type(transformer).__name__,
        "family": adapter.family,
        "stream_widths": widths,
        "groups": groups,
        "max_gap": max_gap,
        "ridge": ridge,
        "features": list(features),
        "trend_max_gap": trend_max_gap,
        "version": VERSION,
        **(meta or {}),
    }
    return LearnedForecast(coef, error, delta, info)


def forecast_errors(
    forecast: LearnedForecast | None, trajectories: list[dict[str, Any]], cadence: int, kind: str = "learned"
) -> float:
    """Relative residual error ‖R̂ − R‖/‖R‖ over every block when computing every ``cadence``-th
    step (steps 0, c, 2c, … computed; each skipped step forecast from the last two computes),
    on clean inputs: ``kind`` = learned | reuse | extrapolate (first order in steps)."""
    err2 = norm2 = 0.0
    for traj in trajectories:
        n_blocks, n_steps = len(traj["inputs"]), len(traj["inputs"][0])
        for block in range(n_blocks):
            ins, res = traj["inputs"][block], traj["residuals"][block]
            for t in range(1, n_steps):
                if t % cadence == 0:
                    continue
                b = (t // cadence) * cadence
                g = t - b
                a = b - cadence if b - cadence >= 0 else None
                for k, r_t in enumerate(res[t]):
                    r_b = res[b][k]
                    trend = (g / (b - a)) * (r_b - res[a][k]) if a is not None else None
                    if kind == "reuse" or (kind == "extrapolate" and trend is None):
                        pred = r_b
                    elif kind == "extrapolate":
                        pred = r_b + trend
                    else:
                        pred = forecast.predict(block, t, g, k, ins[t][k], ins[b][k], r_b, trend) - ins[t][k]
                    err2 += float((pred - r_t).double().pow(2).sum())
                    norm2 += float(r_t.double().pow(2).sum())
    return (err2 / max(norm2, 1e-30)) ** 0.5
