"""TeaCache (``Tea``).

Before block 0, measure the relative L1 change of block 0's timestep-modulated input against
the previous step, map it through the model's rescaling polynomial (published TeaCache
coefficients, or ones fitted by ``python -m xfuser.model_executor.cache.calibrate``), clamp it
at 0 (a change indicator cannot be negative; some published polynomials dip below 0 near 0),
and accumulate. While the sum stays below ``cache_ratio_threshold`` the whole stack is
skipped: the output is this step's stack input plus the cached stack residual. The first and
last steps always compute; computing resets the sum.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from xfuser.logger import init_logger, warn_once
from xfuser.model_executor.cache.adapters.base import BlockCall, Streams
from xfuser.model_executor.cache.methods.base import CacheMethod

logger = init_logger(__name__)

IDENTITY = (1.0, 0.0)
SHIPPED = Path(__file__).resolve().parents[1] / "coefficients"


def shipped_coefficients(transformer) -> list[float] | None:
    """Coefficients fitted with the calibrate command for a specific checkpoint, shipped in
    ``cache/coefficients/<checkpoint name>.json`` (matched on the model directory's name)."""
    name = getattr(getattr(transformer, "config", None), "_name_or_path", None) or ""
    parts = [p for p in Path(str(name)).parts if p not in ("transformer", "")]
    if not parts:
        return None
    path = SHIPPED / f"{parts[-1]}.json"
    if not path.exists():
        return None
    return [float(c) for c in json.loads(path.read_text())["coefficients"]]


class TeaCache(CacheMethod):
    name = "Tea"

    def __init__(self, manager) -> None:
        super().__init__(manager)
        coefficients = (
            getattr(self.config, "tea_coefficients", None)
            or shipped_coefficients(manager.transformer)
            or manager.adapter.tea_coefficients_for(manager.transformer)
        )
        if coefficients is None:
            warn_once(
                logger,
                "no TeaCache coefficients for %s: using the identity rescale %s; fit real ones with "
                "`python -m xfuser.model_executor.cache.calibrate --model ... --out coeffs.json` and pass "
                "them as tea_coefficients",
                manager.adapter.family,
                IDENTITY,
            )
            coefficients = IDENTITY
        self.coefficients = tuple(float(c) for c in coefficients)
        self.rescale = np.poly1d(self.coefficients)

    def reset(self) -> None:
        self.reset_stack()
        self.prev_modulated: torch.Tensor | None = None
        self.accumulated = 0.0
        self.computed_once = False  # a whole step has been computed: stack references exist
        self.skip = False
        self.consecutive = 0

    def step_tensors(self) -> tuple:
        return (self.prev_modulated,)

    def step_state_size(self, n_tokens: int) -> int:
        return 1

    def export_step_state(self, n_tokens: int) -> list[float]:
        return [float(self.skip)]

    def import_step_state(self, values: list[float]) -> None:
        self.skip = bool(values[0])

    def run_block(self, index: int, call: BlockCall) -> tuple[Streams, str, float]:
        m = self.manager
        if index == 0:
            modulated = m.adapter.modulated_input(call)
            if self.prev_modulated is not None:
                sums = torch.stack(
                    [(modulated - self.prev_modulated).abs().float().sum(), self.prev_modulated.abs().float().sum()]
                )
                num, den = m.sync.reduce_sum(sums).tolist()
                change = num / max(den, 1e-12)
                self.accumulated += max(float(self.rescale(change)), 0.0)
                m.stats.metric("modulated_input_change", change)
            m.stats.metric("accumulated", self.accumulated)
            self.prev_modulated = modulated
            self.skip = (
                not m.forced_compute()
                and self.computed_once
                and m.may_skip(self.consecutive)
                and self.accumulated < self.config.cache_ratio_threshold
            )
            if self.skip:
                self.consecutive += 1
            else:
                self.consecutive = 0
                self.accumulated = 0.0
                self.computed_once = True
        return self.stack_block(index, call, self.skip)
