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

``--single_process_reference``: every rank first runs the plain pipeline in one process on
the same inputs, uncached and with each method, and each parallel method is compared with the
uncached image (the parallel scheme's error with the cache's on top) and with the
single-process image of the *same* method (the parallel scheme's own error with that cache on:
PipeFusion's stale K/V is approximate by design, and this shows whether caching enlarges it). Bytes are also reported per process group (``pp`` = PipeFusion P2P + final broadcast).
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xfuser import strict_json  # noqa: E402
from xfuser import xFuserArgs  # noqa: E402
from xfuser.core.attention import usp  # noqa: E402
from xfuser.core.distributed import all_coordinators, destroy_distributed_environment, get_world_group  # noqa: E402
from xfuser.logger import init_logger  # noqa: E402
from xfuser.metrics import psnr, relative_l2, ssim  # noqa: E402
from xfuser.timing import summarize, timed  # noqa: E402
from xfuser.config.defaults import DEFAULT_MODEL  # noqa: E402
from xfuser.model_executor.pipelines.decode import decode_images  # noqa: E402
import xfuser.testing.tiny_pipelines  # noqa: E402,F401 - registers the tiny-* and random model types
from xfuser.model_executor.pipelines.model_types import (  # noqa: E402
    all_model_types,
    call_defaults,
    check_model_type,
    load_pipeline,
    resolve_model,
)

logger = init_logger("benchmark.cache_execution_xfuser")


def bytes_sent() -> int:
    coordinator_bytes = sum(c.bytes_sent for name, c in all_coordinators().items())
    return coordinator_bytes + usp.comm_bytes["ulysses"] + usp.comm_bytes["ring"]


def reset_bytes() -> None:
    for c in all_coordinators().values():
        c.reset_counters()
    usp.reset_comm_bytes()


def load(model_type: str | None, engine):
    """The pipeline: ``--model_type`` (upstream's spelling; built in memory for tiny-* types)
    through the benchmarks' loader, else ``--model`` through the examples' loader (which names
    what a broken directory holds, or what to pass for an unreachable hub id)."""
    if model_type is not None:
        model = None if engine.model_config.model == model_type else engine.model_config.model
        return load_pipeline(model_type, model, dtype=engine.model_config.torch_dtype)
    from diffusers import DiffusionPipeline

    from xfuser.cli import load_pipeline as load_checkpoint

    return load_checkpoint(DiffusionPipeline, engine)


def with_model_type(args: xFuserArgs, model_type: str | None) -> xFuserArgs:
    """``args`` for ``--model_type``: its checkpoint unless ``--model`` was given, and a tiny
    type's size, guidance and text length where the flags leave them unset."""
    if model_type is None:
        return args
    check_model_type(model_type)
    given = None if args.model == DEFAULT_MODEL else args.model
    args.model = resolve_model(model_type, given) or model_type  # built in memory: the type names it
    for key, value in call_defaults(model_type).items():
        if hasattr(args, key) and getattr(args, key) is None:
            setattr(args, key, value)
    return args


def single_process_images(model_type: str | None, engine, inputs, methods: list[str]) -> dict[str, tuple[torch.Tensor, object]]:
    """Latents and decoded image of the plain pipeline in one process (own copy), uncached
    (key ``"plain"``) and with each cache method of ``methods`` under the same cache flags."""
    from xfuser import xFuserFastCachePipelineWrapper
    from xfuser.model_executor.pipelines.call_args import prepare_call_kwargs

    pipe = load(model_type, engine)
    pipe.set_progress_bar_config(disable=True)
    kwargs = prepare_call_kwargs(pipe, inputs.height, inputs.width)
    kwargs.update(prompt=inputs.prompt[:1], num_inference_steps=inputs.num_inference_steps, output_type="latent")
    if inputs.guidance_scale is not None:
        kwargs["guidance_scale"] = inputs.guidance_scale
    if inputs.max_sequence_length is not None:
        kwargs["max_sequence_length"] = inputs.max_sequence_length
    if inputs.negative_prompt:
        kwargs["negative_prompt"] = inputs.negative_prompt

    def run(call) -> tuple[torch.Tensor, object]:
        out = call(**kwargs, generator=torch.Generator(device="cpu").manual_seed(inputs.seed))
        return out.images.float().cpu(), decode_images(pipe, out.images, kwargs.get("height"), kwargs.get("width"))[0]

    images = {"plain": run(pipe)}
    wrapper = xFuserFastCachePipelineWrapper(pipe)
    for method in methods:
        wrapper.enable_cache(config=dataclasses.replace(engine.cache_config, method=method))
        images[method] = run(wrapper)
    return images


def main(argv: list[str] | None = None) -> int:
    parser = xFuserArgs.add_cli_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("--model_type", default=None, choices=all_model_types(),
                        help="a model type of benchmark/cache_execute.py (upstream's spelling); its checkpoint unless "
                             "--model is given, a tiny-* type is built in memory")
    parser.add_argument("--cache_methods", nargs="+", default=["None", "Fast", "Fb", "Tea"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output_dir", default="benchmark_results")
    parser.add_argument("--single_process_reference", action="store_true",
                        help="also compare every method with an uncached single-process run")
    ns = parser.parse_args(argv)
    args = with_model_type(xFuserArgs.from_cli_args(ns), ns.model_type)
    args.cache_method = "None"
    args.output_type = "latent"
    engine, inputs = args.create_config()

    from xfuser.parallel import xDiTParallel

    pipe = load(ns.model_type, engine)
    torch.set_grad_enabled(False)
    single = None
    if ns.single_process_reference:
        single = single_process_images(ns.model_type, engine, inputs, ns.cache_methods)
    runner = xDiTParallel(pipe, engine, inputs)
    results, decoded = {}, {}
    reference = None
    try:
        for method in ["None", *[m for m in ns.cache_methods if m != "None"]]:
            config = dataclasses.replace(engine.cache_config, method=method)  # every cache flag applies
            runner.enable_cache(config)
            runner()  # warm-up
            times, sent = [], []
            for _ in range(ns.repeats):
                reset_bytes()
                out, seconds = timed(runner, runner.device)
                times.append(seconds)
                sent.append(bytes_sent() / max(len(runner.local_prompts()), 1))
            latents = out.images.float().cpu()
            kwargs = runner.call_kwargs()
            image = decode_images(pipe, out.images, kwargs.get("height"), kwargs.get("width"))[0]
            if method == "None":
                reference, reference_image = latents, image
            decoded[method] = image
            stats = runner.get_cache_statistics()
            results[method] = {
                "latency_s": summarize(times)["median_s"],
                "latency_min_s": summarize(times)["min_s"],
                "bytes_sent_per_image": statistics.median(sent),
                "usp_bytes": dict(usp.comm_bytes),
                "hit_ratio": stats["hit_ratio"],
                "compute_fraction": stats["compute_fraction"],
                "peak_memory": stats.get("peak_memory"),
                "cache_state_bytes": stats["cache_state_bytes"]["total"],
                "rel_l2_vs_uncached": relative_l2(latents, reference),
                "psnr_vs_uncached": psnr(image, reference_image),
                "ssim_vs_uncached": ssim(image, reference_image),
                "bytes_per_group": {name: c.bytes_sent for name, c in all_coordinators().items() if c.bytes_sent},
            }
            if single is not None:
                single_latents, single_image = single["plain"]
                same_latents, same_image = single[method]
                results[method].update(
                    rel_l2_vs_single_process=relative_l2(latents, single_latents),
                    psnr_vs_single_process=psnr(image, single_image),
                    ssim_vs_single_process=ssim(image, single_image),
                    # the parallel scheme's own error with this cache on (None: = the above)
                    rel_l2_vs_single_process_same_cache=relative_l2(latents, same_latents),
                    psnr_vs_single_process_same_cache=psnr(image, same_image),
                    # what the cache costs in one process, for comparison
                    psnr_single_process_cache_vs_plain=psnr(same_image, single_image),
                )
        everyone = get_world_group().all_gather_object(results)
        if get_world_group().is_first_rank:
            out_dir = Path(ns.output_dir)
            out_dir.mkdir(parents=True, exist_ok=True)
            p = engine.parallel_config
            report = {
                "model": engine.model_config.model,
                "parallel": dict(
                    dp=p.dp_degree, cfg=p.cfg_degree, ulysses=p.ulysses_degree, ring=p.ring_degree, pp=p.pp_degree,
                    num_pipeline_patch=p.num_pipeline_patch if p.pp_degree > 1 else None,
                    warmup_steps=engine.runtime_config.warmup_steps if p.pp_degree > 1 else None,
                ),
                "num_inference_steps": inputs.num_inference_steps,
                "cache_ratio_threshold": ns.cache_ratio_threshold,
                "per_rank": everyone,
                "images": {},
            }
            for method, image in decoded.items():  # rank 0's image of its first prompt, per method
                path = out_dir / f"{method}.png"
                image.save(path)
                report["images"][method] = path.name
            (out_dir / "results_parallel.json").write_text(strict_json.dumps(report, indent=2))
            for method, r in everyone[0].items():
                logger.info(
                    "%s: %.3fs, %.2f MB sent/image/rank, hit %.2f, rel L2 %.2e, PSNR %.2f dB vs uncached%s",
                    method, r["latency_s"], r["bytes_sent_per_image"] / 1e6, r["hit_ratio"], r["rel_l2_vs_uncached"],
                    r["psnr_vs_uncached"],
                    f", PSNR {r['psnr_vs_single_process']:.2f} dB vs single process" if "psnr_vs_single_process" in r else "",
                )
    finally:
        destroy_distributed_environment()
    return 0


if __name__ == "__main__":
    from xfuser.cli import run_script  # bad input: one `error:` line, exit 2

    run_script(main)
