"""Fit TeaCache rescaling coefficients for any supported model.

    python -m xfuser.model_executor.cache.calibrate --model assets/models/xfuser-shapes-pixart \
        --out coeffs.json [--prompts ...] [--num_inference_steps 20] [--degree 4]

For every step of uncached generations over several prompts we record x = relative L1 change
of block 0's timestep-modulated input (what TeaCache can see before computing) and y =
relative L1 change of the block stack's output (what skipping would get wrong), then fit
``np.polyfit(x, y, degree)`` (highest power first, TeaCache's convention). Pass the result to
``enable_cache("Tea", tea_coefficients=...)`` or ``--tea_coefficients coeffs.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xfuser.logger import init_logger
from xfuser.model_executor.cache.adapters.base import adapter_for

logger = init_logger(__name__)

DEFAULT_PROMPTS = [
    "a red circle on a blue background, top left",
    "a green square on a white background, center",
    "a yellow triangle on a black background, bottom right",
    "a white circle on a green background, top right",
    "a blue square on a yellow background, bottom left",
    "a black triangle on a red background, center",
]


def _rel_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().float().sum() / b.abs().float().sum().clamp_min(1e-12)).item()


class _Recorder:
    """Hooks on the first and last block that record Tea's indicator and the stack output."""

    def __init__(self, transformer) -> None:
        self.adapter = adapter_for(transformer)
        slots = self.adapter.blocks(transformer)
        first_list, first_pos = slots[0]
        last_list, last_pos = slots[-1]
        self.modulated: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []
        self.handles = [
            first_list[first_pos].register_forward_pre_hook(self._pre_first, with_kwargs=True),
            last_list[last_pos].register_forward_hook(self._post_last),
        ]
        self._first = first_list[first_pos]

    def _pre_first(self, module, args, kwargs):
        call = self.adapter.bind(module, args, kwargs)
        self.modulated.append(self.adapter.modulated_input(call).detach().float().cpu())

    def _post_last(self, module, args, output):
        self.outputs.append(self.adapter.output_streams(output)[0].detach().float().cpu())

    def pairs(self) -> tuple[list[float], list[float]]:
        xs = [_rel_l1(self.modulated[i], self.modulated[i - 1]) for i in range(1, len(self.modulated))]
        ys = [_rel_l1(self.outputs[i], self.outputs[i - 1]) for i in range(1, len(self.outputs))]
        return xs, ys

    def clear(self) -> None:
        self.modulated.clear()
        self.outputs.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def fit_coefficients(pipe, prompts: list[str], num_inference_steps: int, degree: int = 4, seed: int = 0, **call_kwargs: Any) -> dict[str, Any]:
    """Run uncached generations and fit the rescaling polynomial; returns a JSON-ready dict."""
    from xfuser.model_executor.pipelines.call_args import prepare_call_kwargs

    recorder = _Recorder(pipe.transformer)
    xs: list[float] = []
    ys: list[float] = []
    device = pipe.transformer.device
    try:
        for i, prompt in enumerate(prompts):
            recorder.clear()
            kwargs = prepare_call_kwargs(pipe, **call_kwargs)
            generator = torch.Generator(device="cpu").manual_seed(seed + i)
            with torch.no_grad():
                pipe(prompt=prompt, num_inference_steps=num_inference_steps, generator=generator, output_type="latent", **kwargs)
            x, y = recorder.pairs()
            xs.extend(x)
            ys.extend(y)
            logger.info("prompt %d/%d: %d step pairs", i + 1, len(prompts), len(x))
    finally:
        recorder.remove()
    coefficients = np.polyfit(np.asarray(xs), np.asarray(ys), degree)
    fitted = np.poly1d(coefficients)(np.asarray(xs))
    residual = float(np.sqrt(np.mean((fitted - np.asarray(ys)) ** 2)))
    return {
        "family": recorder.adapter.family,
        "transformer": type(pipe.transformer).__name__,
        "coefficients": [float(c) for c in coefficients],
        "degree": degree,
        "num_points": len(xs),
        "rms_residual": residual,
        "input_change_range": [float(min(xs)), float(max(xs))],
        "num_inference_steps": num_inference_steps,
        "prompts": prompts,
        "device": str(device),
    }


def load_coefficients(path: str | Path) -> list[float]:
    """Read the ``coefficients`` list from a file written by this command."""
    data = json.loads(Path(path).read_text())
    return [float(c) for c in data["coefficients"]]


def main(argv: list[str] | None = None) -> int:
    from xfuser.config.defaults import default_model_path

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="diffusers model dir or hub id (default: the embedded model)")
    parser.add_argument("--out", required=True, help="output JSON path")
    parser.add_argument("--prompts", nargs="+", default=DEFAULT_PROMPTS)
    parser.add_argument("--num_inference_steps", "--num-inference-steps", type=int, default=20)
    parser.add_argument("--degree", type=int, default=4)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.num_inference_steps < args.degree + 2:
        parser.error(f"--num_inference_steps must be at least --degree + 2 = {args.degree + 2}")

    from diffusers import DiffusionPipeline

    model = args.model or str(default_model_path())
    pipe = DiffusionPipeline.from_pretrained(model, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    result = fit_coefficients(
        pipe, args.prompts, args.num_inference_steps, args.degree, args.seed, height=args.height, width=args.width
    )
    result["model"] = model
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    logger.info("wrote %s: coefficients %s (rms residual %.4g over %d points)", args.out, result["coefficients"], result["rms_residual"], result["num_points"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
