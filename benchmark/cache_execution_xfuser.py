"""Cache methods through the parallel runner, with communication volume per image.

    torchrun --nproc_per_node=2 benchmark/cache_execution_xfuser.py --ulysses_degree 2 --cache_methods None Fast
    torchrun --nproc_per_node=2 benchmark/cache_execution_xfuser.py --ring_degree 2 --cache_methods None Fb Tea Fast

Accepts every xFuserArgs flag (model, sizes, degrees, cache knobs). For each method: one
untimed warm-up generation, then ``--repeats`` timed ones (median), the hit ratio, and the
bytes this rank sent per image: USP attention (Ulysses all-to-alls + Ring K/V hops, counted
from tensor sizes) plus every coordinator collective (gathers, CFG exchange, cache metric
reductions). Rank 0 writes ``--output_dir/results_parallel.json`` with every rank's numbers,
the relative L2 distance of each method's latents from this run's uncached latents and the
PSNR/SSIM of its decoded image vs the uncached image (decoding is not timed).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xfuser import xFuserArgs  # noqa: E402
from xfuser.config import CacheConfig  # noqa: E402
from xfuser.core.attention import usp  # noqa: E402
from xfuser.core.distributed import all_coordinators, destroy_distributed_environment, get_world_group  # noqa: E402
from xfuser.logger import init_logger  # noqa: E402
from xfuser.metrics import psnr, relative_l2, ssim  # noqa: E402
from xfuser.model_executor.pipelines.decode import decode_images  # noqa: E402

logger = init_logger("benchmark.cache_execution_xfuser")


def bytes_sent() -> int:
    coordinator_bytes = sum(c.bytes_sent for name, c in all_coordinators().items())
    return coordinator_bytes + usp.comm_bytes["ulysses"] + usp.comm_bytes["ring"]


def reset_bytes() -> None:
    for c in all_coordinators().values():
        c.reset_counters()
    usp.reset_comm_bytes()


def main() -> int:
    parser = xFuserArgs.add_cli_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("--cache_methods", nargs="+", default=["None", "Fast", "Fb", "Tea"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output_dir", default="benchmark_results")
    ns = parser.parse_args()
    args = xFuserArgs.from_cli_args(ns)
    args.cache_method = "None"
    args.output_type = "latent"
    engine, inputs = args.create_config()

    from diffusers import DiffusionPipeline

    from xfuser.parallel import xDiTParallel

    pipe = DiffusionPipeline.from_pretrained(engine.model_config.model, dtype=engine.model_config.torch_dtype)
    torch.set_grad_enabled(False)
    runner = xDiTParallel(pipe, engine, inputs)
    results = {}
    reference = None
    try:
        for method in ["None", *[m for m in ns.cache_methods if m != "None"]]:
            config = CacheConfig(
                method=method, cache_ratio_threshold=ns.cache_ratio_threshold, motion_threshold=ns.motion_threshold,
                significance_level=ns.significance_level, cache_warmup_steps=ns.cache_warmup_steps,
            )
            runner.enable_cache(config)
            runner()  # warm-up
            times, sent = [], []
            for _ in range(ns.repeats):
                reset_bytes()
                start = time.perf_counter()
                out = runner()
                times.append(time.perf_counter() - start)
                sent.append(bytes_sent() / max(len(runner.local_prompts()), 1))
            latents = out.images.float().cpu()
            kwargs = runner.call_kwargs()
            image = decode_images(pipe, out.images, kwargs.get("height"), kwargs.get("width"))[0]
            if method == "None":
                reference, reference_image = latents, image
            stats = runner.get_cache_statistics()
            results[method] = {
                "latency_s": statistics.median(times),
                "bytes_sent_per_image": statistics.median(sent),
                "usp_bytes": dict(usp.comm_bytes),
                "hit_ratio": stats["hit_ratio"],
                "compute_fraction": stats["compute_fraction"],
                "rel_l2_vs_uncached": relative_l2(latents, reference),
                "psnr_vs_uncached": psnr(image, reference_image),
                "ssim_vs_uncached": ssim(image, reference_image),
            }
        everyone = get_world_group().all_gather_object(results)
        if get_world_group().is_first_rank:
            out_dir = Path(ns.output_dir)
            out_dir.mkdir(parents=True, exist_ok=True)
            p = engine.parallel_config
            report = {
                "model": engine.model_config.model,
                "parallel": dict(dp=p.dp_degree, cfg=p.cfg_degree, ulysses=p.ulysses_degree, ring=p.ring_degree),
                "num_inference_steps": inputs.num_inference_steps,
                "cache_ratio_threshold": ns.cache_ratio_threshold,
                "per_rank": everyone,
            }
            (out_dir / "results_parallel.json").write_text(json.dumps(report, indent=2))
            for method, r in everyone[0].items():
                logger.info(
                    "%s: %.3fs, %.2f MB sent/image/rank, hit %.2f, rel L2 %.2e, PSNR %.2f dB vs uncached",
                    method, r["latency_s"], r["bytes_sent_per_image"] / 1e6, r["hit_ratio"], r["rel_l2_vs_uncached"],
                    r["psnr_vs_uncached"],
                )
    finally:
        destroy_distributed_environment()
    return 0


if __name__ == "__main__":
    sys.exit(main())
