"""Speed and quality of each cache method against the uncached run, on the same inputs.

    python benchmark/cache_execute.py                                   # embedded model, all methods
    python benchmark/cache_execute.py --cache_methods Fast Fb --sweep --num_inference_steps 20
    python benchmark/cache_execute.py --model_type pixart-sigma-random --height 256 --width 256

For every (prompt, seed) the uncached output is the reference. Latency is the median over
``--repeats`` timed runs after one untimed warm-up run, all in this process. Quality: PSNR and
SSIM of the decoded image vs the reference image, relative L2 of the final latents.
Everything is written to ``--output_dir`` (results.json + images).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xfuser import xFuserFastCachePipelineWrapper  # noqa: E402
from xfuser.config import CacheConfig, default_model_path  # noqa: E402
from xfuser.logger import init_logger  # noqa: E402
from xfuser.metrics import psnr, relative_l2, ssim  # noqa: E402
from xfuser.model_executor.pipelines.call_args import prepare_call_kwargs  # noqa: E402

logger = init_logger("benchmark.cache_execute")

DEFAULT_THRESHOLDS = {"Fast": [0.05, 0.1, 0.2], "Fb": [0.05, 0.1, 0.2], "Tea": [0.1, 0.3, 0.6]}
SWEEP_THRESHOLDS = {
    "Fast": [0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5],
    "Fb": [0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5],
    "Tea": [0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.2],
}
DEFAULT_PROMPTS = [
    "a red circle on a blue background, top left",
    "a yellow triangle on a black background, center",
    "a white square on a green background, bottom right",
]


def load(args) -> Any:
    if args.model_type == "pixart-sigma-random":
        from xfuser.testing.tiny_pipelines import build_random_pixart_sigma

        return build_random_pixart_sigma(num_layers=args.layers, hidden=args.hidden)
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(args.model or default_model_path(), dtype=torch.float32)


def run_once(wrapper, pipe, prompt: str, seed: int, args) -> tuple[Any, torch.Tensor, float]:
    kwargs = prepare_call_kwargs(pipe, args.height, args.width)
    if args.guidance_scale is not None:
        kwargs["guidance_scale"] = args.guidance_scale
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    latents = wrapper(prompt=prompt, num_inference_steps=args.num_inference_steps, generator=generator, output_type="latent", **kwargs).images
    seconds = time.perf_counter() - start
    with torch.no_grad():
        image = pipe.image_processor.postprocess(
            pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0], output_type="pil"
        )[0]
    return image, latents, seconds


def measure(wrapper, pipe, args, cases, references=None) -> dict[str, Any]:
    """Median latency over cases x repeats, quality vs ``references`` (same cases)."""
    times, outputs = [], []
    run_once(wrapper, pipe, cases[0][0], cases[0][1], args)  # warm-up, untimed
    for prompt, seed in cases:
        per_case = []
        for _ in range(args.repeats):
            image, latents, seconds = run_once(wrapper, pipe, prompt, seed, args)
            per_case.append(seconds)
        times.append(statistics.median(per_case))
        outputs.append((image, latents, wrapper.get_cache_statistics()))
    result: dict[str, Any] = {"latency_s": statistics.median(times), "latency_per_case_s": times}
    if references is not None:
        result["psnr"] = [psnr(o[0], r[0]) for o, r in zip(outputs, references)]
        result["ssim"] = [ssim(o[0], r[0]) for o, r in zip(outputs, references)]
        result["rel_l2_latents"] = [relative_l2(o[1], r[1]) for o, r in zip(outputs, references)]
        result["psnr_mean"] = statistics.mean(min(p, 100.0) for p in result["psnr"])
        result["ssim_mean"] = statistics.mean(result["ssim"])
    stats = [o[2] for o in outputs if o[2]]
    if stats:
        result["hit_ratio"] = statistics.mean(s["hit_ratio"] for s in stats)
        result["compute_fraction"] = statistics.mean(s["compute_fraction"] for s in stats)
        result["stats"] = stats[0]
    return result, outputs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_type", default="pixart", help="pixart | pixart-sigma-random (random 12-layer PixArt-Σ)")
    parser.add_argument("--model", default=None, help="diffusers model dir (default: the embedded model)")
    parser.add_argument("--cache_methods", nargs="+", default=["None", "Fast", "Fb", "Tea"])
    parser.add_argument("--thresholds", nargs="+", type=float, default=None, help="one list for every method")
    parser.add_argument("--sweep", action="store_true", help="threshold sweep per method (speed-quality curves)")
    parser.add_argument("--num_inference_steps", type=int, default=20)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--guidance_scale", type=float, default=None)
    parser.add_argument("--prompts", nargs="+", default=DEFAULT_PROMPTS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--motion_threshold", type=float, default=0.1)
    parser.add_argument("--layers", type=int, default=12, help="pixart-sigma-random only")
    parser.add_argument("--hidden", type=int, default=384, help="pixart-sigma-random only")
    parser.add_argument("--output_dir", default="benchmark_results")
    args = parser.parse_args(argv)

    torch.set_grad_enabled(False)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe = load(args)
    pipe.set_progress_bar_config(disable=True)
    wrapper = xFuserFastCachePipelineWrapper(pipe)
    cases = [(p, s) for p in args.prompts for s in args.seeds]

    report: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''}, torch threads={torch.get_num_threads()}",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "model": args.model or (args.model_type if args.model_type != "pixart" else default_model_path()),
        "num_inference_steps": args.num_inference_steps,
        "cases": cases,
        "runs": [],
    }
    baseline, references = measure(wrapper, pipe, args, cases)
    for i, (image, _, _) in enumerate(references):
        image.save(out_dir / f"None_case{i}.png")
    report["baseline"] = {"latency_s": baseline["latency_s"]}
    logger.info("uncached: %.3fs", baseline["latency_s"])

    for method in args.cache_methods:
        if method == "None":
            # bookkeeping overhead: the manager installed, every block computed
            wrapper.enable_cache("Fast", cache_ratio_threshold=0.0, motion_threshold=0.0)
            forced, _ = measure(wrapper, pipe, args, cases)
            wrapper.disable_cache()
            report["overhead_fast_forced_compute"] = forced["latency_s"] / baseline["latency_s"] - 1
            for m in ("Fb", "Tea"):
                wrapper.enable_cache(m, cache_ratio_threshold=0.0)
                forced, _ = measure(wrapper, pipe, args, cases)
                wrapper.disable_cache()
                report[f"overhead_{m.lower()}_forced_compute"] = forced["latency_s"] / baseline["latency_s"] - 1
            continue
        thresholds = args.thresholds or (SWEEP_THRESHOLDS if args.sweep else DEFAULT_THRESHOLDS)[method]
        for threshold in thresholds:
            config = CacheConfig(method=method, cache_ratio_threshold=threshold, motion_threshold=args.motion_threshold)
            wrapper.enable_cache(config=config)
            result, outputs = measure(wrapper, pipe, args, cases, references)
            wrapper.disable_cache()
            result.update(method=method, threshold=threshold, speedup=baseline["latency_s"] / result["latency_s"])
            for i, (image, _, _) in enumerate(outputs):
                image.save(out_dir / f"{method}_{threshold:g}_case{i}.png")
            report["runs"].append(result)
            logger.info(
                "%s %.3g: %.2fx, PSNR %.2f dB, SSIM %.4f, hit %.2f",
                method, threshold, result["speedup"], result["psnr_mean"], result["ssim_mean"], result.get("hit_ratio", 0),
            )
    (out_dir / "results.json").write_text(json.dumps(report, indent=2, default=str))
    logger.info("wrote %s", out_dir / "results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
