"""FastCache (``Fast``): per-block statistical skip test, fitted linear approximation, spatial
token reduction and an adaptive threshold. The maths is in docs/methods/fastcache.md.

Per step, at the stack input X_t (image tokens):
  * token saliency s_i = ‖X_t,i − X_{t−1},i‖² (summed over the batch); a token is *static* when
    s_i ≤ motion_threshold · mean(s) and *motion* otherwise (motion_threshold = 0 disables it);
  * S_var = variance over tokens of the per-token relative change ‖ΔX_i‖/‖X_{t−1},i‖;
  * τ_t = cache_ratio_threshold · max(0, 1 + (β1·S_var + β2·t + β3·t²)/β0), t ∈ [0, 1] the
    real normalised timestep (1 = pure noise).
Per block l, with H_ref its input at the last step it was computed:
  * δ = ‖H_t − H_ref‖_F / ‖H_ref‖_F. Null hypothesis "the input moved by at most τ_t per unit
    of RMS": with n = number of tokens (the independent units), n·δ²/τ_t² ~ χ²(n), so the block
    is skipped iff δ ≤ τ_t·sqrt(χ²_{1−α}(n)/n), α = significance_level;
  * with a calibration file (``approximation="learned"``, the default when one is found):
    the block is skipped iff E·δ/δ_cal ≤ τ_t·sqrt(χ²_{1−α}(n)/n), E the learned forecast's
    expected error at this block, step and gap and δ_cal the input change it was measured at
    (forecast.py), and a skipped block returns the learned forecast;
  * otherwise skipped → a first-order forecast of the residual (``extrapolate``), or
    H_out = Y_ref + (H_t − H_ref)(I + A), Y_ref the block output at that step: with
    A = 0 this is plain residual reuse (H_t + R_ref, written so that a repeated input returns
    Y_ref exactly); A is ridge-fitted online; ``auto`` uses the one with the lower error on
    held-out computed steps;
  * computed with static tokens present → motion tokens go through the block attending to the
    keys/values of *all* tokens; static tokens take the approximation.
"""
from __future__ import annotations

from functools import lru_cache

import torch
from scipy.stats import chi2

from xfuser.logger import init_logger, warn_once
from xfuser.model_executor.cache.adapters.base import BlockCall, Streams
from xfuser.model_executor.cache.forecast import CALIBRATE_HINT, ForecastError, LearnedForecast, find_forecast, load_forecast, stream_widths
from xfuser.model_executor.cache.linear_approx import RidgeResidualMap
from xfuser.model_executor.cache.methods.base import CacheMethod, tensor_bytes

logger = init_logger(__name__)


@lru_cache(maxsize=4096)
def chi2_bound_factor(significance_level: float, dof: int) -> float:
    """sqrt(χ²_{1−α}(n) / n): how far δ may exceed τ before the change is significant."""
    return float(chi2.ppf(1.0 - significance_level, dof) / dof) ** 0.5


class _BlockState:
    def __init__(self, index: int, n_streams: int, ridge: float) -> None:
        self.index = index
        self.in_ref: Streams | None = None
        self.ref2: torch.Tensor | None = None  # Σ in_ref² (+ extras), on the device: the δ test's denominator
        self.extras_ref: Streams | None = None
        self.out_ref: list[torch.Tensor] | None = None
        self.maps = [RidgeResidualMap(ridge) for _ in range(n_streams)]
        self.consecutive = 0
        self.last_step = -1  # step of the last (whole or partial) compute: the learned forecast's gap
        self.fits_seen = 0  # computed steps since the map became ready (evaluation cadence)
        # held-out squared errors of both predictors, local (pending) and synced (totals)
        self.pending: torch.Tensor | None = None  # on the model's device: no host sync to add to it
        self.err_reuse = self.err_fit = self.err_norm = 0.0
        # (clock, step, residuals) of the last two whole-block computes: the forecasts' history
        self.history: list[tuple[float, int, list[torch.Tensor]]] = []

    def nbytes(self) -> int:
        residuals = [r for _, _, rs in self.history for r in rs]
        return tensor_bytes([*(self.in_ref or ()), *(self.extras_ref or ()), *(self.out_ref or ()), *residuals])

    @property
    def has_trend(self) -> bool:
        """Two whole computes since the last partial one (a partial compute clears the history)."""
        return len(self.history) == 2


class FastCache(CacheMethod):
    name = "Fast"
    FIT_TOKENS = 128  # tokens per step the linear fit sees (cost O(FIT_TOKENS·D²) per computed block)
    EVAL_EVERY = 3  # held-out evaluation (and re-solve, O(D³)) on every 3rd computed step of a block

    def __init__(self, manager) -> None:
        super().__init__(manager)
        self.approximation = self.config.approximation
        self.forecast: LearnedForecast | None = None
        self.forecast_source: str | None = None
        self.forecast_explicit = False
        if self.approximation == "learned":
            self._load_forecast()
        # only `fitted`/`auto` use the ridge map; with threshold 0 nothing is approximated either way
        self.fit_enabled = self.approximation in ("fitted", "auto") and self.config.cache_ratio_threshold > 0
        self.ridge = float(getattr(self.config, "ridge", 0.1))
        if self.config.motion_threshold > 0 and not manager.adapter.supports_token_subset:
            warn_once(
                logger,
                "Fast: spatial token reduction is not implemented for %s blocks; motion_threshold=%s "
                "has no effect on this model (block-level skipping and the fitted approximation still apply)",
                manager.adapter.family,
                self.config.motion_threshold,
            )

    def _load_forecast(self) -> None:
        """The calibration named in the config, else ``fastcache.safetensors`` beside the model;
        without one, today's first-order forecast (and one line saying how to calibrate)."""
        m = self.manager
        path = getattr(self.config, "calibration", None)
        self.forecast_explicit = path is not None
        path = path or find_forecast(m.transformer)
        if path is None:
            warn_once(
                logger,
                "Fast: no calibration for %s, so skipped blocks use the first-order forecast; learn one with `%s`",
                type(m.transformer).__name__, CALIBRATE_HINT,
            )
            self.approximation = "extrapolate"
            return
        forecast = load_forecast(path)
        forecast.check_matches(m.transformer, m.num_blocks, stream_widths(m.transformer, m.adapter), str(path))
        self.forecast, self.forecast_source = forecast, str(path)

    def _forecast_for_run(self) -> LearnedForecast | None:
        """The learned forecast if it was fitted for this run's step count (explicit file: an
        error otherwise; a file found beside the model: a warning and the first-order forecast)."""
        steps = self.manager.num_steps
        if self.forecast is None or steps is None or steps == self.forecast.num_steps:
            return self.forecast
        try:
            self.forecast.check_steps(steps, self.forecast_source)
        except ForecastError as exc:
            if self.forecast_explicit:
                raise
            warn_once(logger, "Fast: %s; using the first-order forecast for this run", exc)
        return None

    def reset(self) -> None:
        self.active_forecast = self._forecast_for_run() if self.approximation == "learned" else None
        n_streams = len(self.manager.adapter.streams)
        self.blocks = [_BlockState(i, n_streams, self.ridge) for i in range(self.manager.num_blocks)]
        self.prev_stack_in: torch.Tensor | None = None
        self.tau = self.config.cache_ratio_threshold
        self.static_index: torch.Tensor | None = None
        self.motion_index: torch.Tensor | None = None
        self.motion_fraction = 1.0

    # ------------------------------------------------------------------ per step
    def _start_step(self, call: BlockCall) -> None:
        m, cfg = self.manager, self.config
        x = call.streams[0]
        self.static_index = self.motion_index = None
        self.tau = cfg.cache_ratio_threshold
        if self.prev_stack_in is not None and self.prev_stack_in.shape == x.shape:
            diff = (x - self.prev_stack_in).float().pow(2).sum(-1)  # (B, N) squared change per token
            ref = self.prev_stack_in.float().pow(2).sum(-1).clamp_min(1e-12)
            rel = (diff / ref).sqrt()
            # per-token saliency summed over the batch; CFG peers hold the other batch entries
            saliency = m.sync.reduce_batch(diff.sum(0))  # (N_local,)
            n_local = float(saliency.numel())
            sums = torch.stack(
                [diff.sum(), torch.tensor(n_local, device=x.device), rel.sum(), rel.pow(2).sum(), torch.tensor(float(rel.numel()), device=x.device)]
            ).double()
            s_sum, n_tok, r_sum, r2_sum, r_cnt = m.sync.reduce_sum(sums).tolist()
            mean_s = s_sum / (n_tok / m.sync.batch_world)  # token positions, not (token, CFG-rank) pairs
            s_var = max(r2_sum / r_cnt - (r_sum / r_cnt) ** 2, 0.0)
            b0, b1, b2, b3 = cfg.betas
            t = m.t_norm if m.t_norm is not None else 0.0
            self.tau = cfg.cache_ratio_threshold * max(0.0, 1.0 + (b1 * s_var + b2 * t + b3 * t * t) / b0)
            m.stats.metric("tau", self.tau)
            m.stats.metric("s_var", s_var)
            if cfg.motion_threshold > 0 and m.adapter.supports_token_subset and not m.forced_compute():
                self._select_tokens(saliency <= cfg.motion_threshold * mean_s)
        self.prev_stack_in = x

    def _select_tokens(self, static: torch.Tensor) -> None:
        """Motion/static split, padded so every SP rank computes the same number of query rows
        (the Ulysses exchange needs equal shapes); padding rows are static tokens (or repeats),
        whose computed values are overwritten by the approximation afterwards."""
        m = self.manager
        motion = (~static).nonzero().flatten()
        self.motion_rows = motion  # the real motion tokens: only they move the references
        counts = m.sync.seq_counts(len(motion), device=static.device)
        total_motion, n_tokens = sum(counts), len(static) * len(counts)
        if total_motion == 0 or total_motion == n_tokens:
            return  # nothing to reduce, or nothing static: compute whole blocks
        target = max(counts)
        if len(motion) < target:
            pool = torch.cat([motion, static.nonzero().flatten()])
            motion = torch.cat([motion, pool[: target - len(motion)]])
        self.motion_index = motion
        self.static_index = static.nonzero().flatten()
        self.motion_fraction = total_motion / n_tokens

    # ------------------------------------------------------------------ PipeFusion hand-over
    def step_state_size(self, n_tokens: int) -> int:
        return 4 + 2 * n_tokens

    def export_step_state(self, n_tokens: int) -> list[float]:
        """τ_t and the motion/static split of this rank's ``n_tokens`` image tokens for the
        later stages: the padded query index (its length, then the rows, -1 filled; padding may
        repeat rows) and a 0/1 mask of the real motion rows."""
        index = torch.full((n_tokens,), -1.0, dtype=torch.float64)
        rows = torch.zeros(n_tokens, dtype=torch.float64)
        has_split = self.motion_index is not None
        count = 0
        if has_split:
            count = len(self.motion_index)
            index[:count] = self.motion_index.cpu().double()
            rows[self.motion_rows.cpu()] = 1.0
        return [self.tau, float(has_split), self.motion_fraction, float(count), *index.tolist(), *rows.tolist()]

    def import_step_state(self, values: list[float]) -> None:
        self.tau = values[0]
        self.manager.stats.metric("tau", self.tau)
        self.static_index = self.motion_index = None
        if values[1]:
            device = next(self.manager.transformer.parameters()).device
            n_tokens = (len(values) - 4) // 2
            count = int(values[3])
            self.motion_fraction = values[2]
            self.motion_index = torch.tensor(values[4:4 + count], dtype=torch.long, device=device)
            rows = torch.tensor(values[4 + n_tokens:], device=device)
            self.motion_rows = (rows == 1).nonzero().flatten()
            self.static_index = (rows == 0).nonzero().flatten()

    # ------------------------------------------------------------------ per block
    def run_block(self, index: int, call: BlockCall) -> tuple[Streams, str, float]:
        m, cfg = self.manager, self.config
        if index == 0:
            self._start_step(call)
        st = self.blocks[index]
        x, extras = call.streams, call.extras
        if m.forced_compute() or st.in_ref is None or not m.may_skip(st.consecutive):
            st.consecutive = 0
            return self._compute(st, call), "C", 1.0
        forecast = self.active_forecast
        if forecast is not None:
            expected, delta_cal = forecast.expected_error(index, m.step, m.step - st.last_step, st.has_trend)
            if expected == float("inf"):  # beyond the calibrated gaps: compute (same on every rank)
                st.consecutive = 0
                return self._compute(st, call), "C", 1.0
        # δ test (one reduction carries the pending held-out errors of this block as well)
        if st.ref2 is None:
            st.ref2 = sum(torch.linalg.vector_norm(b.float()).double().square() for b in (*st.in_ref, *st.extras_ref))
        diff2 = sum(torch.dist(a.float(), b.float()).double().square() for a, b in zip((*x, *extras), (*st.in_ref, *st.extras_ref)))
        n_tokens = x[0].shape[0] * x[0].shape[1]
        device = x[0].device
        parts = [diff2, st.ref2]
        if m.sync.world_size > 1:  # SP ranks hold different token counts: the χ² test needs the total
            parts.append(torch.tensor(float(n_tokens), dtype=torch.float64, device=device))
        if self.fit_enabled:
            pending = st.pending if st.pending is not None else torch.zeros(3, dtype=torch.float64, device=device)
            parts.extend(pending.unbind())
        # the one host read of this block's decision
        values = m.sync.reduce_sum(torch.stack(parts)).tolist()
        if m.sync.world_size == 1:
            values.insert(2, float(n_tokens))
        diff2, ref2, n_total = values[:3]
        if self.fit_enabled:
            e_reuse, e_fit, e_norm = values[3:]
            st.pending = None
            st.err_reuse += e_reuse
            st.err_fit += e_fit
            st.err_norm += e_norm
        delta = (diff2 / max(ref2, 1e-24)) ** 0.5
        bound = self.tau * chi2_bound_factor(cfg.significance_level, max(int(n_total), 1))
        if forecast is not None:
            # the input change, scaled into what the learned forecast is expected to get wrong
            delta = expected * delta / delta_cal
        if delta <= bound:
            m.block_skipped(call)
            st.consecutive += 1
            use_fit = self._use_fit(st)
            return self._approximate(st, x, use_fit), ("A" if use_fit or self.active_forecast is not None else "R"), 0.0
        st.consecutive = 0
        if self.motion_index is not None:
            return self._compute_partial(st, call), "P", self.motion_fraction
        return self._compute(st, call), "C", 1.0

    def _token_stride(self, dx: torch.Tensor) -> int:
        """Power-of-two stride keeping about ``FIT_TOKENS`` of the sequence's tokens."""
        if dx.ndim != 3:
            return 1
        total = dx.shape[1] * self.manager.sync.seq_world
        stride = 1
        while total // (stride * 2) >= self.FIT_TOKENS:
            stride *= 2
        return stride

    def _use_fit(self, st: _BlockState) -> bool:
        if not self.fit_enabled or not st.maps[0].ready:
            return False
        if self.approximation == "fitted":
            return True
        return st.err_norm > 0 and st.err_fit < st.err_reuse  # auto: the better on held-out steps

    def _slope(self, st: _BlockState) -> float | None:
        """Steps of the residual's last change to extrapolate by: (t_now − t_ref)/(t_ref − t_prev)."""
        if self.approximation != "extrapolate" or len(st.history) < 2:
            return None
        (t_prev, _, _), (t_ref, _, _) = st.history
        t_now = self._clock()
        if t_ref == t_prev:
            return None
        return (t_now - t_ref) / (t_ref - t_prev)

    def _forecast_learned(self, st: _BlockState, x: Streams) -> Streams:
        """The learned forecast from the last compute (and the trend to the one before it)."""
        step = self.manager.step
        gap = step - st.last_step
        use_trend = st.has_trend and self.active_forecast.uses_trend(gap)
        out = []
        for k, (xk, ref, yref) in enumerate(zip(x, st.in_ref, st.out_ref)):
            # the last compute's residual: kept in the history for whole computes, else from the refs
            r_ref = st.history[-1][2][k] if st.history else yref - ref
            trend = None
            if use_trend:
                trend = (gap / (st.last_step - st.history[0][1])) * (r_ref - st.history[0][2][k])
            out.append(self.active_forecast.predict(st.index, step, gap, k, xk, ref, r_ref, trend))
        return tuple(out)

    def state_bytes(self) -> list[int]:
        """Bytes of cached tensors per block (references and forecast history)."""
        out = [st.nbytes() for st in self.blocks]
        out[0] += tensor_bytes([self.prev_stack_in])
        return out

    def extra_statistics(self) -> dict:
        forecast = self.active_forecast
        if forecast is None:
            return {}
        return {"forecast": {"source": self.forecast_source, "table_bytes": forecast.nbytes(),
                             "features": list(forecast.features), "groups": forecast.meta.get("groups")}}

    def _clock(self) -> float:
        """The denoising position the forecast runs on: the real timestep when known, else the step."""
        m = self.manager
        return float(m.t_norm) if m.t_norm is not None else float(m.step)

    def _approximate(self, st: _BlockState, x: Streams, use_fit: bool) -> Streams:
        if self.active_forecast is not None:
            return self._forecast_learned(st, x)
        out = []
        slope = self._slope(st)
        for k, (xk, ref, yref) in enumerate(zip(x, st.in_ref, st.out_ref)):
            dx = xk - ref
            y = yref + dx
            if slope is not None:
                # R(t) ≈ R_ref + slope·(R_ref − R_prev): the residual's trend between the last two computes
                r_prev, r_ref = st.history[0][2][k], st.history[1][2][k]
                y = y + slope * (r_ref - r_prev)
            if use_fit:
                st.maps[k].solve(self.manager.sync)
                y = y + st.maps[k].correction(dx)
            out.append(y)
        return tuple(out)

    def _compute(self, st: _BlockState, call: BlockCall) -> Streams:
        x, extras = call.streams, call.extras
        out = self.manager.compute(call)
        if self.fit_enabled and st.in_ref is not None and all(r.shape == i.shape for r, i in zip(st.in_ref, x)):
            stride = self._token_stride(x[0])

            def sub(t: torch.Tensor) -> torch.Tensor:
                return t[:, ::stride] if t.ndim == 3 else t

            dxs = [sub(i - r) for i, r in zip(x, st.in_ref)]
            drs = [sub(o - oref) - dx for o, oref, dx in zip(out, st.out_ref, dxs)]  # ΔR: what reuse gets wrong
            if st.maps[0].ready and st.fits_seen % self.EVAL_EVERY == 0:
                # held-out check of both predictors (fitted on earlier steps only) against the truth
                e_reuse = e_fit = norm = torch.zeros((), dtype=torch.float32, device=x[0].device)
                for k, (dx, dr, o, xk) in enumerate(zip(dxs, drs, out, x)):
                    st.maps[k].solve(self.manager.sync)
                    e_reuse += dr.float().pow(2).sum()
                    e_fit += (dr - st.maps[k].correction(dx)).float().pow(2).sum()
                    norm += sub(o - xk).float().pow(2).sum()  # relative to the block's residual
                errors = torch.stack([e_reuse, e_fit, norm]).double()
                st.pending = errors if st.pending is None else st.pending + errors
            if st.maps[0].ready:
                st.fits_seen += 1
            for k, (dx, dr) in enumerate(zip(dxs, drs)):
                st.maps[k].observe(dx, dr)
        st.in_ref, st.extras_ref, st.out_ref = tuple(x), tuple(extras), list(out)
        st.ref2 = None
        st.last_step = self.manager.step
        if self.approximation in ("extrapolate", "learned"):
            keep = 0 if self.active_forecast is not None and not self.active_forecast.needs_trend else 1
            st.history = [*st.history[len(st.history) - keep:], (self._clock(), st.last_step, [o - i for o, i in zip(out, x)])]
        return out

    def _compute_partial(self, st: _BlockState, call: BlockCall) -> Streams:
        x = call.streams
        idx, static = self.motion_index, self.static_index
        use_fit = self._use_fit(st)
        approx = self._approximate(st, x, use_fit)
        out = list(self.manager.compute_token_subset(call, idx))
        out[0][:, static] = approx[0][:, static]
        # references move only where we computed
        in_ref, out_ref = list(st.in_ref), list(st.out_ref)
        in_ref[0] = in_ref[0].clone()
        out_ref[0] = out_ref[0].clone()
        rows = self.motion_rows
        in_ref[0][:, rows] = x[0][:, rows]
        out_ref[0][:, rows] = out[0][:, rows]
        st.in_ref, st.out_ref = tuple(in_ref), out_ref
        st.extras_ref = tuple(call.extras)
        st.ref2 = None
        st.history = []  # a partly computed residual is no point of the trend
        st.last_step = self.manager.step
        return tuple(out)

    def held_out_errors(self) -> dict[int, dict[str, float]]:
        """Relative held-out error of residual reuse vs the fitted map, per block."""
        out = {}
        for b, st in enumerate(self.blocks):
            if st.err_norm > 0:
                out[b] = {
                    "reuse_rel_error": (st.err_reuse / st.err_norm) ** 0.5,
                    "fitted_rel_error": (st.err_fit / st.err_norm) ** 0.5,
                    "chosen": "fitted" if self._use_fit(st) else "reuse",
                }
        return out
