"""CFG parallel at the transformer boundary: each CFG rank runs its half of the batched
(uncond, cond) forward and the halves are all-gathered, so the pipeline's guidance, scheduler
step and latents are identical on every rank, exactly as in the batched single-process run.
"""
from __future__ import annotations

from typing import Any

import torch

from xfuser.core.distributed.group_coordinator import GroupCoordinator


def _batch_size(args: tuple, kwargs: dict) -> int:
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    if not torch.is_tensor(hidden):
        raise TypeError("CFG parallel needs the transformer's hidden_states as a tensor")
    return hidden.shape[0]


class CFGSplit:
    """Forward hooks that slice the batch before and gather it after the transformer."""

    def __init__(self, transformer: torch.nn.Module, cfg_group: GroupCoordinator) -> None:
        self.group = cfg_group
        self._batch = None
        self.handles = [
            transformer.register_forward_pre_hook(self._pre, with_kwargs=True, prepend=True),
            transformer.register_forward_hook(self._post),
        ]

    def _slice(self, value: Any) -> Any:
        if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == self._batch:
            part = self._batch // self.group.world_size
            r = self.group.rank_in_group
            return value[r * part:(r + 1) * part]
        if isinstance(value, dict):
            return {k: self._slice(v) for k, v in value.items()}
        return value

    def _pre(self, module, args, kwargs):
        self._batch = _batch_size(args, kwargs)
        if self._batch % self.group.world_size:
            raise ValueError(
                f"CFG parallel needs an even batch (uncond + cond), got {self._batch}; "
                "is classifier-free guidance on (--guidance_scale > 1)?"
            )
        return tuple(self._slice(a) for a in args), {k: self._slice(v) for k, v in kwargs.items()}

    def _post(self, module, args, output):
        if isinstance(output, tuple):
            return (self.group.all_gather(output[0].contiguous(), dim=0), *output[1:])
        output.sample = self.group.all_gather(output.sample.contiguous(), dim=0)
        return output

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
