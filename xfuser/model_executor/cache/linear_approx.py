"""Fitted linear approximation of a skipped block (FastCache's H_out = W·H_in + b, made real).

Around the block's last computed step (input X_ref, residual R_ref = Y_ref - X_ref) we model

    Y_t ≈ X_t + R_ref + (X_t - X_ref) A        i.e.  W = I + A,  b = R_ref - X_ref A,

and fit A by closed-form ridge regression on pairs of *consecutive computed steps* of the
same block: ΔX = X_t - X_ref (tokens x D), ΔR = R_t - R_ref. With A = 0 this is exactly
residual reuse, and the ridge penalty shrinks A towards it, so the fitted map can only
differ from reuse where the data support it; the manager measures both on held-out steps.
Sufficient statistics (ΔXᵀΔX, ΔXᵀΔR) are accumulated locally and summed over the sync group
only when a solve is needed, so every rank solves the same system.
"""
from __future__ import annotations

import torch

from xfuser.model_executor.cache.sync import SyncGroup


class RidgeResidualMap:
    """Ridge fit of ΔR ≈ ΔX·A for one stream of one block (statistics kept in float32)."""

    def __init__(self, ridge: float = 0.1) -> None:
        self.ridge = ridge
        self.gram: torch.Tensor | None = None  # synced ΔXᵀΔX
        self.cross: torch.Tensor | None = None  # synced ΔXᵀΔR
        self._pending_gram: torch.Tensor | None = None
        self._pending_cross: torch.Tensor | None = None
        self.A: torch.Tensor | None = None
        self.pairs = 0  # number of (step, step) pairs accumulated locally

    def observe(self, dx: torch.Tensor, dr: torch.Tensor, token_stride: int = 1) -> None:
        """Add one step pair; (batch, tokens, D) inputs keep every ``token_stride``-th token
        (bounds the O(tokens·D²) cost; a stride that divides the local token count selects
        the same tokens as the single-process run, so SP ranks fit the same A)."""
        if dx.ndim == 3 and token_stride > 1:
            dx, dr = dx[:, ::token_stride], dr[:, ::token_stride]
        x = dx.reshape(-1, dx.shape[-1]).float()
        r = dr.reshape(-1, dr.shape[-1]).float()
        gram, cross = x.T @ x, x.T @ r
        if self._pending_gram is None:
            self._pending_gram, self._pending_cross = gram, cross
        else:
            self._pending_gram += gram
            self._pending_cross += cross
        self.pairs += 1

    @property
    def ready(self) -> bool:
        return self.pairs > 0

    def solve(self, sync: SyncGroup) -> torch.Tensor:
        """(Re)solve A if new statistics arrived; collective over ``sync`` in that case.

        Callers must call this at the same point on every rank (it is tied to an agreed
        decision), because whether it communicates depends on the step, not on local data.
        """
        if self._pending_gram is not None:
            packed = torch.cat([self._pending_gram, self._pending_cross], dim=1)
            packed = sync.reduce_sum(packed)
            d = self._pending_gram.shape[0]
            gram, cross = packed[:, :d], packed[:, d:]
            self.gram = gram if self.gram is None else self.gram + gram
            self.cross = cross if self.cross is None else self.cross + cross
            self._pending_gram = self._pending_cross = None
            d = self.gram.shape[0]
            scale = torch.trace(self.gram) / d + 1e-12
            eye = torch.eye(d, dtype=self.gram.dtype, device=self.gram.device)
            self.A = torch.linalg.solve(self.gram + self.ridge * scale * eye, self.cross)
        if self.A is None:
            raise RuntimeError("RidgeResidualMap.solve() called before any observation")
        return self.A

    def correction(self, dx: torch.Tensor) -> torch.Tensor:
        """ΔX·A in the dtype of ``dx`` (call :meth:`solve` first)."""
        return (dx.float() @ self.A).to(dx.dtype)
