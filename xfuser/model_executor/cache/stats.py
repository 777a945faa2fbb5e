"""Per-generation cache statistics, returned as plain data (JSON-ready).

Actions per (step, block): ``C`` computed, ``R`` reused a cached residual (or passed
through inside a reused stack), ``A`` replaced by the fitted linear approximation, ``P``
computed for the motion tokens only. The FLOP estimate weights each block by its parameter
count (linear layers dominate a DiT block) and a partial block by its computed token
fraction; it ignores the K/V projections a partial block still computes for every token,
so it slightly overstates what token reduction saves.

``hit_ratio`` counts only fully skipped block evaluations (``R``/``A``); partially computed
ones (``P``) are ``partial_ratio``. Counting ``P`` as a hit let the hit ratio exceed the work
actually skipped (0.9 beside a compute fraction of 0.49): now ``hit_ratio + partial_ratio <=
1`` and ``hit_ratio <= skipped_fraction`` (the unweighted share of block work not computed;
``flops_skipped_fraction`` is the same weighted by block size).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ACTIONS = ("C", "R", "A", "P")


@dataclass
class CacheStatistics:
    method: str
    num_blocks: int
    block_weights: list[float]
    steps: list[dict[str, Any]] = field(default_factory=list)
    approximation: dict[int, dict[str, float]] = field(default_factory=dict)

    def begin_step(self, step: int, t: float | None) -> None:
        self.steps.append(
            {"step": step, "t": t, "actions": ["C"] * self.num_blocks, "token_fraction": [1.0] * self.num_blocks, "metrics": {}}
        )

    def record(self, block: int, action: str, token_fraction: float = 1.0) -> None:
        if not self.steps:
            self.begin_step(0, None)
        current = self.steps[-1]
        current["actions"][block] = action
        current["token_fraction"][block] = token_fraction

    def metric(self, name: str, value: float) -> None:
        if self.steps:
            self.steps[-1]["metrics"][name] = value

    def decision_log(self) -> list[tuple]:
        return [
            (s["step"], "|".join("".join(a) for a, _ in units), tuple(round(f, 6) for _, fr in units for f in fr))
            for s in self.steps
            for units in [_units(s)]
        ]

    @classmethod
    def merge_patches(cls, parts: list["CacheStatistics"]) -> "CacheStatistics":
        """One record per step from per-patch statistics (PipeFusion): a step keeps every
        patch's actions (``patches``); counts and the compute fraction average over patches,
        which are equal-sized. The step's own actions and metrics are its first patch's."""
        merged = cls(parts[0].method, parts[0].num_blocks, parts[0].block_weights)
        by_step: dict[int, list[dict[str, Any]]] = {}
        for part in parts:
            for record in part.steps:
                by_step.setdefault(record["step"], []).append(record)
        for step in sorted(by_step):
            records = by_step[step]
            first = records[0]
            entry = {**first, "actions": list(first["actions"]), "token_fraction": list(first["token_fraction"])}
            if len(records) > 1:
                entry["patches"] = [(list(r["actions"]), list(r["token_fraction"])) for r in records]
            merged.steps.append(entry)
        return merged

    def summary(self) -> dict[str, Any]:
        per_block = []
        total_weight = sum(self.block_weights) * max(len(self.steps), 1)
        computed_weight = computed_units = 0.0
        evaluations = hits = partials = 0
        for b in range(self.num_blocks):
            counts = {a: 0 for a in ACTIONS}
            fractions = []
            for s in self.steps:
                units = _units(s)
                for actions, token_fraction in units:  # one unit per latent patch (PipeFusion)
                    a = actions[b]
                    counts[a] += 1
                    frac = token_fraction[b] if a in ("C", "P") else 0.0
                    fractions.append(frac)
                    computed_weight += self.block_weights[b] * frac / len(units)
                    computed_units += frac
                    evaluations += 1
                    hits += a in ("R", "A")
                    partials += a == "P"
            per_block.append(
                {
                    "block": b,
                    "computed": counts["C"],
                    "reused": counts["R"],
                    "approximated": counts["A"],
                    "partial": counts["P"],
                    "mean_token_fraction": sum(fractions) / len(fractions) if fractions else 1.0,
                    **({"approximation": self.approximation[b]} if b in self.approximation else {}),
                }
            )
        per_step = [
            {
                **({"patch_actions": ["".join(a) for a, _ in s["patches"]]} if "patches" in s else {}),
                "step": s["step"],
                "t": s["t"],
                "actions": "".join(s["actions"]),
                "computed_blocks": sum(a == "C" for a in s["actions"]),
                "token_fraction": s["token_fraction"],
                **s["metrics"],
            }
            for s in self.steps
        ]
        compute_fraction = computed_weight / total_weight if total_weight else 1.0
        return {
            "method": self.method,
            "num_steps": len(self.steps),
            "num_blocks": self.num_blocks,
            "hit_ratio": hits / evaluations if evaluations else 0.0,
            "partial_ratio": partials / evaluations if evaluations else 0.0,
            "skipped_fraction": 1.0 - computed_units / evaluations if evaluations else 0.0,
            "compute_fraction": compute_fraction,
            "flops_skipped_fraction": 1.0 - compute_fraction,
            "per_block": per_block,
            "per_step": per_step,
        }


def _units(step: dict[str, Any]) -> list[tuple[list[str], list[float]]]:
    """(actions, token fractions) of each latent patch of a step; one unit outside PipeFusion."""
    return step.get("patches") or [(step["actions"], step["token_fraction"])]
