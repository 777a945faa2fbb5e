"""Calibrate a cache method offline on uncached generations of any supported model.

    python -m xfuser.model_executor.cache.calibrate --model DIR --method Fast \
        [--prompts-file F | --num-prompts N] [--num_inference_steps 20] [--out DIR/fastcache.safetensors]
    python -m xfuser.model_executor.cache.calibrate --model DIR --method Tea --out coeffs.json [--degree 4]

``--method Fast`` learns FastCache's forecast of a skipped block (forecast.py, forecast_fit.py)
and writes ``fastcache.safetensors`` beside the model, where FastCache finds it. Prompts:
``--prompts``/``--prompts-file`` (one per line), else the model's own
``calibration_prompts.txt`` (the embedded model ships one, disjoint from every evaluation
prompt), else a built-in general-purpose list; ``--num-prompts`` takes the first N.

``--method Tea``: for every step of uncached generations over several prompts we record x = relative L1 change
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
from xfuser.model_executor.cache.forecast import FEATURES
from xfuser.model_executor.cache.forecast_fit import DEFAULT_FEATURES, DEFAULT_MAX_GAP, DEFAULT_TREND_MAX_GAP

logger = init_logger(__name__)

DEFAULT_PROMPTS = [
    "a red circle on a blue background, top left",
    "a green square on a white background, center",
    "a yellow triangle on a black background, bottom right",
    "a white circle on a green background, top right",
    "a blue square on a yellow background, bottom left",
    "a black triangle on a red background, center",
]
#: for checkpoints without their own calibration_prompts.txt: varied subjects, scenes and styles
GENERAL_PROMPTS = [
    "a photograph of an astronaut riding a horse on the moon",
    "a watercolor painting of a quiet harbour at sunrise",
    "a close-up portrait of an old fisherman, dramatic lighting",
    "a bowl of ramen on a wooden table, studio photo",
    "a futuristic city skyline at night with neon signs",
    "a red fox sitting in a snowy forest",
    "an isometric illustration of a cozy library",
    "a vintage car parked on a cobblestone street in the rain",
    "a macro photo of a dew drop on a green leaf",
    "a mountain lake reflecting pine trees, golden hour",
    "a cartoon robot watering flowers in a garden",
    "an oil painting of a sailing ship in a storm",
]
PROMPTS_FILE = "calibration_prompts.txt"


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


def calibration_prompts(model: str, prompts: list[str] | None, prompts_file: str | None, num_prompts: int | None) -> list[str]:
    """The prompts to calibrate on (see the module docstring for the order of precedence)."""
    if prompts_file:
        lines = Path(prompts_file).read_text().splitlines()
    elif prompts:
        lines = list(prompts)
    elif (Path(model) / PROMPTS_FILE).is_file():
        lines = (Path(model) / PROMPTS_FILE).read_text().splitlines()
    else:
        lines = list(GENERAL_PROMPTS)
    lines = [p.strip() for p in lines if p.strip() and not p.startswith("#")]
    return lines[:num_prompts] if num_prompts else lines


def calibrate_fast(pipe, model: str, prompts: list[str], args: argparse.Namespace) -> Path:
    """Record uncached trajectories, fit the forecast, save it; returns the file's path."""
    import time

    from xfuser.model_executor.cache.forecast_fit import fit_forecast, record_trajectories

    start = time.perf_counter()
    trajectories = record_trajectories(
        pipe, prompts, args.num_inference_steps, args.seed, args.max_tokens, height=args.height, width=args.width
    )
    recorded = time.perf_counter() - start
    meta = {"num_inference_steps": args.num_inference_steps, "prompts": prompts, "seed": args.seed,
            "max_tokens": args.max_tokens, "height": args.height, "width": args.width}
    forecast = fit_forecast(trajectories, pipe.transformer, max_gap=args.max_gap, groups=args.groups, ridge=args.ridge,
                            meta=meta, features=tuple(args.features), trend_max_gap=args.trend_max_gap)
    out = Path(args.out) if args.out else Path(model) / "fastcache.safetensors"
    forecast.save(out)
    logger.info(
        "wrote %s (%d blocks x %d steps x gaps 1..%d, %d channel groups, %.1f kB) in %.1f s (recording %.1f s)",
        out, forecast.num_blocks, forecast.num_steps, forecast.max_gap, forecast.meta["groups"], forecast.nbytes() / 1e3,
        time.perf_counter() - start, recorded,
    )
    return out


def main(argv: list[str] | None = None) -> int:
    from xfuser.config.defaults import default_model_path

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="diffusers model dir or hub id (default: the embedded model)")
    parser.add_argument("--method", default="Tea", choices=["Tea", "Fast"], help="what to calibrate (Tea)")
    parser.add_argument("--out", default=None, help="output path (Fast: default MODEL/fastcache.safetensors; Tea: required)")
    parser.add_argument("--prompts", nargs="+", default=None)
    parser.add_argument("--prompts-file", "--prompts_file", dest="prompts_file", default=None, help="one prompt per line")
    parser.add_argument("--num-prompts", "--num_prompts", dest="num_prompts", type=int, default=None, help="use the first N prompts")
    parser.add_argument("--num_inference_steps", "--num-inference-steps", type=int, default=20)
    parser.add_argument("--degree", type=int, default=4, help="Tea: polynomial degree (4)")
    parser.add_argument("--max-gap", "--max_gap", dest="max_gap", type=int, default=DEFAULT_MAX_GAP,
                        help=f"Fast: most steps a forecast reaches ahead ({DEFAULT_MAX_GAP})")
    parser.add_argument("--groups", type=int, default=None, help="Fast: channel groups per coefficient (default: the head count)")
    parser.add_argument("--features", nargs="+", default=list(DEFAULT_FEATURES), choices=list(FEATURES),
                        help=f"Fast: forecast terms (default: {' '.join(DEFAULT_FEATURES)})")
    parser.add_argument("--trend-max-gap", "--trend_max_gap", dest="trend_max_gap", type=int, default=DEFAULT_TREND_MAX_GAP,
                        help=f"Fast: use the trend term for gaps up to this many steps ({DEFAULT_TREND_MAX_GAP})")
    parser.add_argument("--ridge", type=float, default=1e-3, help="Fast: shrinkage towards reuse, relative to the mean eigenvalue (1e-3)")
    parser.add_argument("--max-tokens", "--max_tokens", dest="max_tokens", type=int, default=256, help="Fast: token rows recorded per stream (256)")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0, help="prompt i draws its latents from seed + i (0)")
    args = parser.parse_args(argv)
    if args.method == "Tea" and not args.out:
        parser.error("--method Tea needs --out FILE.json")
    if args.method == "Tea" and args.num_inference_steps < args.degree + 2:
        parser.error(f"--num_inference_steps must be at least --degree + 2 = {args.degree + 2}")
    if args.method == "Fast" and (args.max_gap < 1 or args.max_tokens < 1 or (args.groups is not None and args.groups < 1)):
        parser.error("--max-gap, --max-tokens and --groups must be >= 1")
    if args.num_prompts is not None and args.num_prompts < 1:
        parser.error("--num-prompts must be >= 1")
    if args.prompts_file and not Path(args.prompts_file).is_file():
        parser.error(f"--prompts-file {args.prompts_file}: no such file")

    from diffusers import DiffusionPipeline

    model = args.model or str(default_model_path())
    prompts = calibration_prompts(model, args.prompts if args.method == "Fast" else (args.prompts or DEFAULT_PROMPTS),
                                  args.prompts_file, args.num_prompts)
    if not prompts:
        parser.error("no calibration prompts (the prompts file is empty)")
    pipe = DiffusionPipeline.from_pretrained(model, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    if args.method == "Fast":
        if args.groups is not None:
            from xfuser.model_executor.cache.forecast import stream_widths

            widths = stream_widths(pipe.transformer, adapter_for(pipe.transformer))
            if any(w % args.groups for w in widths):
                parser.error(f"--groups {args.groups} must divide the stream widths {widths}")
        calibrate_fast(pipe, model, prompts, args)
        return 0
    result = fit_coefficients(
        pipe, prompts, args.num_inference_steps, args.degree, args.seed, height=args.height, width=args.width
    )
    result["model"] = model
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    logger.info("wrote %s: coefficients %s (rms residual %.4g over %d points)", args.out, result["coefficients"], result["rms_residual"], result["num_points"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
