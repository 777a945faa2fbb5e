"""One cached generation with its statistics, optionally against the uncached run.

    python examples/run_fastcache_test.py                                  # embedded model, FastCache
    python examples/run_fastcache_test.py --cache_method Fb --cache_ratio_threshold 0.1 --compare_baseline
    python examples/run_fastcache_test.py --model_type flux --model /path/to/FLUX.1-schnell --num_inference_steps 4

Writes ``<output_dir>/<model_type>_<method>.png`` and ``..._stats.json`` (cache statistics,
latency, and with ``--compare_baseline`` the uncached image, the speed-up measured in this
process after an untimed warm-up, PSNR/SSIM vs the uncached image).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xfuser import strict_json  # noqa: E402
from xfuser import xFuserFastCachePipelineWrapper  # noqa: E402
from xfuser.config import CacheConfig  # noqa: E402
from xfuser.logger import init_logger  # noqa: E402
from xfuser.metrics import psnr, ssim  # noqa: E402
from xfuser.timing import model_device, timed  # noqa: E402
from xfuser.model_executor.pipelines.call_args import prepare_call_kwargs  # noqa: E402
import xfuser.testing.tiny_pipelines  # noqa: E402,F401 - registers the tiny-* and random model types
from xfuser.model_executor.pipelines.model_types import all_model_types, default_size, load_pipeline  # noqa: E402

logger = init_logger("examples.run_fastcache_test")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_type", default="pixart", choices=all_model_types())
    parser.add_argument("--model", default=None, help="diffusers folder or hub id (default: the type's default; pixart: the embedded model)")
    parser.add_argument("--prompt", default="a red circle on a blue background, top left")
    parser.add_argument("--num_inference_steps", type=int, default=30)
    parser.add_argument("--cache_method", default="Fast", choices=["None", "Fast", "Fb", "Tea"])
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--height", type=int, default=None, help="default: 768 for hub ids, else the model's native size")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--guidance_scale", type=float, default=None)
    parser.add_argument("--cache_ratio_threshold", type=float, default=0.05)
    parser.add_argument("--motion_threshold", type=float, default=0.1)
    parser.add_argument("--compare_baseline", action="store_true", help="also run uncached: speed-up and PSNR/SSIM")
    parser.add_argument("--output_dir", default="fastcache_test_results")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    # every knob is validated before the model loads
    config = CacheConfig(method=args.cache_method, cache_ratio_threshold=args.cache_ratio_threshold, motion_threshold=args.motion_threshold)
    torch.set_grad_enabled(False)
    pipe = load_pipeline(args.model_type, args.model)
    pipe.set_progress_bar_config(disable=True)
    wrapper = xFuserFastCachePipelineWrapper(pipe)
    size = default_size(args.model_type, args.model)
    kwargs = prepare_call_kwargs(pipe, args.height or size, args.width or size)
    if args.guidance_scale is not None:
        kwargs["guidance_scale"] = args.guidance_scale

    def generate():
        out, seconds = timed(lambda: wrapper(prompt=args.prompt, num_inference_steps=args.num_inference_steps,
                                             generator=torch.Generator().manual_seed(args.seed), **kwargs), model_device(pipe))
        return out.images[0], seconds

    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"{args.model_type}_{args.cache_method}"
    result: dict = {"model_type": args.model_type, "cache_method": args.cache_method, "prompt": args.prompt,
                    "seed": args.seed, "num_inference_steps": args.num_inference_steps, **{k: kwargs.get(k) for k in ("height", "width")}}
    if args.compare_baseline:
        generate()  # warm-up: the first call pays one-off costs that are not the baseline's
        baseline, result["baseline_latency_s"] = generate()
        baseline.save(out_dir / f"{args.model_type}_None.png")
    wrapper.enable_cache(config=config)
    if args.compare_baseline:
        generate()
    image, result["latency_s"] = generate()
    image.save(out_dir / f"{name}.png")
    stats = wrapper.get_cache_statistics()
    if args.compare_baseline:
        result["speedup"] = result["baseline_latency_s"] / result["latency_s"]
        result["psnr"] = psnr(image, baseline)
        result["ssim"] = ssim(image, baseline)
    result["cache"] = stats
    (out_dir / f"{name}_stats.json").write_text(strict_json.dumps(result, indent=2, default=str))
    logger.info("%s: %.3fs%s", name, result["latency_s"],
                f", {result['speedup']:.2f}x vs uncached, PSNR {result['psnr']:.2f} dB, SSIM {result['ssim']:.4f}" if args.compare_baseline else "")
    if stats:
        logger.info("hit ratio %.3f, compute fraction %.3f, per step: %s", stats["hit_ratio"], stats["compute_fraction"],
                    " ".join(s["actions"] for s in stats["per_step"]))
    logger.info("wrote %s", out_dir / f"{name}.png")
    return result


if __name__ == "__main__":
    from xfuser.cli import run_script  # bad input: one `error:` line, exit 2

    run_script(main)
