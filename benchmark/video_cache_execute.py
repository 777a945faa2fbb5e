"""Cache methods on a text-to-video DiT: speed, and per-frame quality vs the uncached video.

    python benchmark/video_cache_execute.py --model_type cogvideox --model /data/CogVideoX1.5-5B \
        --num_frames 49 --height 480 --width 720 --cache_methods All
    python benchmark/video_cache_execute.py --model_type tiny-cogvideox --num_inference_steps 2 --num_frames 3
    python benchmark/video_cache_execute.py --model_type consisid --face_image face.png --prompt "a man smiling"

``--height``/``--width``/``--num_frames`` win over a model type's defaults; a size the model
cannot take is refused with one ``error:`` line before compute. ConsisID takes its face from
``--face_image`` (alias ``--img_file_path``, needs ConsisID's face models) or ``--face_embeddings``;
with neither, a synthetic face is generated and logged (timing and caching are real, identity
is meaningless).

Every method runs on the same prompt and seed; the uncached video is the reference. Latency is
the fastest of ``--repeats`` timed runs after an untimed warm-up, each method's speed-up taken
against an uncached latency timed right before it. Quality: PSNR and SSIM per frame (and their
means), relative L2 of the final latents. Writes to ``--output_dir``: one GIF per method, a
stats JSON per method, ``results.json`` (the image benchmark's schema, so ``benchmark/report.py``
draws the same grid, charts and ``report.html`` from it, with a per-frame table added).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from xfuser import strict_json  # noqa: E402
from xfuser import xFuserFastCachePipelineWrapper  # noqa: E402
from xfuser.config import CacheConfig  # noqa: E402
from xfuser.config.config import ConfigError  # noqa: E402
from xfuser.logger import init_logger  # noqa: E402
from xfuser.metrics import psnr, relative_l2, ssim  # noqa: E402
from xfuser.memory import peak_memory, reset_peak_memory  # noqa: E402
from xfuser.timing import model_device, timed  # noqa: E402
from xfuser.model_executor.pipelines.consisid_inputs import FACE_KEYS, add_face_args, check_face_args, face_call_inputs, is_consisid  # noqa: E402
from xfuser.model_executor.pipelines.call_args import accepts, prepare_call_kwargs  # noqa: E402
from xfuser.model_executor.pipelines.input_checks import check_call_inputs  # noqa: E402
import xfuser.testing.tiny_pipelines  # noqa: E402,F401 - registers the tiny-* and random model types
from xfuser.model_executor.pipelines.model_types import call_defaults, load_pipeline, resolve_model, video_model_types  # noqa: E402

logger = init_logger("benchmark.video_cache_execute")
METHODS = ("Fast", "Fb", "Tea")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_type", default="tiny-cogvideox", choices=video_model_types())
    parser.add_argument("--model", default=None, help="diffusers folder or hub id (default: the type's default)")
    parser.add_argument("--prompt", default="a red circle moving from left to right on a blue background")
    parser.add_argument("--cache_methods", nargs="+", default=["All"], choices=["None", *METHODS, "All"])
    parser.add_argument("--num_inference_steps", type=int, default=20)
    parser.add_argument("--num_frames", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--guidance_scale", type=float, default=None)
    parser.add_argument("--max_sequence_length", type=int, default=None)
    parser.add_argument("--cache_ratio_threshold", type=float, nargs="+", default=[0.1],
                        help="one or more thresholds, each run for every method")
    parser.add_argument("--motion_threshold", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--fps", type=int, default=8)
    parser.add_argument("--report", action=argparse.BooleanOptionalAction, default=True, help="grid, charts, report.html")
    parser.add_argument("--output_dir", default="video_benchmark_results")
    add_face_args(parser)  # ConsisID only
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    for flag in ("num_frames", "height", "width"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1")
    for t in args.cache_ratio_threshold:
        CacheConfig(method="Fast", cache_ratio_threshold=t, motion_threshold=args.motion_threshold)  # validates
    check_face_args(args.face_image, args.face_embeddings)  # before anything loads
    return args


def _frames_to_pil(frames: np.ndarray) -> list:
    from PIL import Image

    return [Image.fromarray((np.clip(f, 0, 1) * 255).round().astype(np.uint8)) for f in frames]


class VideoBench:
    def __init__(self, args: argparse.Namespace, extra_call: dict[str, Any] | None = None) -> None:
        self.args = args
        self.pipe = load_pipeline(args.model_type, args.model)
        self.pipe.set_progress_bar_config(disable=True)
        self.wrapper = xFuserFastCachePipelineWrapper(self.pipe)
        self.kwargs = self.call_kwargs(args, extra_call or {})
        self.out_dir = Path(args.output_dir)
        self._latents: torch.Tensor | None = None

    def call_kwargs(self, args: argparse.Namespace, extra_call: dict[str, Any]) -> dict[str, Any]:
        """The type's defaults, overridden by explicit flags, then by ``extra_call``; ConsisID's
        face inputs from the face flags (a built type's own synthetic face is dropped, so every
        ConsisID run takes its face the same way)."""
        defaults = call_defaults(args.model_type)
        explicit = {k: getattr(args, k) for k in ("height", "width", "num_frames", "guidance_scale", "max_sequence_length")
                    if getattr(args, k) is not None}
        size = {k: defaults.pop(k, None) for k in ("height", "width")}
        size.update((k, v) for k, v in explicit.items() if k in size)
        kwargs = prepare_call_kwargs(self.pipe, size["height"], size["width"])
        kwargs.update(defaults)
        kwargs.update(explicit)
        check_call_inputs(self.pipe, kwargs)  # a size the model cannot take: one error line, before compute
        if is_consisid(self.pipe):
            for key in FACE_KEYS:
                kwargs.pop(key, None)
            if "image" not in extra_call:
                kwargs.update(face_call_inputs(
                    self.pipe, face_image=args.face_image, face_embeddings=args.face_embeddings,
                    model=resolve_model(args.model_type, args.model), height=kwargs.get("height"),
                    width=kwargs.get("width"), seed=args.seed,
                ))
        elif args.face_image is not None or args.face_embeddings is not None:
            raise ConfigError(f"--face_image/--face_embeddings: only ConsisID takes a face; --model_type {args.model_type} "
                              f"loads {type(self.pipe).__name__}; drop the face flag")
        kwargs.update(extra_call)
        return kwargs

    def _keep_latents(self, pipe, step, timestep, callback_kwargs):
        self._latents = callback_kwargs["latents"].detach().clone()
        return callback_kwargs

    def run_once(self) -> tuple[np.ndarray, torch.Tensor | None, float]:
        kwargs = dict(self.kwargs)
        if accepts(self.pipe, "callback_on_step_end"):
            kwargs.update(callback_on_step_end=self._keep_latents, callback_on_step_end_tensor_inputs=["latents"])
        self._latents = None
        device = model_device(self.pipe)
        reset_peak_memory(device)
        out, seconds = timed(lambda: self.wrapper(
            prompt=self.args.prompt, num_inference_steps=self.args.num_inference_steps,
            generator=torch.Generator().manual_seed(self.args.seed), output_type="np", **kwargs,
        ), device)
        self.last_peak = peak_memory(device)  # includes the decode: a video VAE's peak is part of the job
        return np.asarray(out.frames[0]), self._latents, seconds

    def latency(self) -> tuple[float, np.ndarray, torch.Tensor | None]:
        self.run_once()  # warm-up, untimed
        times = []
        for _ in range(self.args.repeats):
            frames, latents, seconds = self.run_once()
            times.append(seconds)
        return min(times), frames, latents  # interference only ever adds time

    def save(self, name: str, frames: np.ndarray) -> str:
        from diffusers.utils import export_to_gif

        path = f"{name}.gif"
        export_to_gif(_frames_to_pil(frames), str(self.out_dir / path), fps=self.args.fps)
        return path


def main(argv: list[str] | None = None, extra_call: dict[str, Any] | None = None) -> int:
    """``extra_call``: additional pipeline arguments, winning over the flags (e.g. ConsisID's face
    inputs prepared in Python)."""
    args = parse_args(argv)
    methods = list(METHODS) if "All" in args.cache_methods else [m for m in args.cache_methods if m != "None"]
    torch.set_grad_enabled(False)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bench = VideoBench(args, extra_call)

    baseline_s, ref_frames, ref_latents = bench.latency()
    report: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, threads={torch.get_num_threads()}",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "model": resolve_model(args.model_type, args.model) or args.model_type,
        "model_type": args.model_type,
        "num_inference_steps": args.num_inference_steps,
        "height": int(ref_frames.shape[1]), "width": int(ref_frames.shape[2]), "num_frames": int(ref_frames.shape[0]),
        "cases": [[args.prompt, args.seed]],
        "baseline": {"latency_s": baseline_s, "latency_per_case_s": [baseline_s], "images": [bench.save("None", ref_frames)],
                     "peak_memory_bytes": bench.last_peak.bytes, "peak_memory_kind": bench.last_peak.kind},
        "overhead": {}, "runs": [], "skipped": [],
        "lpips": {"available": False, "reason": "skipped: not computed for videos"},
    }
    logger.info("uncached: %.3fs, %d frames %dx%d", baseline_s, *ref_frames.shape[:3])
    asked = {"num_frames": args.num_frames, "height": args.height, "width": args.width}
    got = dict(zip(("num_frames", "height", "width"), (int(n) for n in ref_frames.shape[:3])))
    changed = [f"--{k} {v} gave {got[k]}" for k, v in asked.items() if v is not None and v != got[k]]
    if changed:  # e.g. a video VAE's temporal compression rounds the frame count
        logger.warning("the model rounded the requested size: %s", ", ".join(changed))
    for method in methods:
        for threshold in args.cache_ratio_threshold:
            baseline_s = bench.latency()[0]
            bench.wrapper.enable_cache(config=CacheConfig(method=method, cache_ratio_threshold=threshold, motion_threshold=args.motion_threshold))
            latency, frames, latents = bench.latency()
            stats = bench.wrapper.get_cache_statistics()
            bench.wrapper.disable_cache()
            name = f"{method}_{threshold:g}"
            frame_psnr = [psnr(f, r) for f, r in zip(frames, ref_frames)]
            frame_ssim = [ssim(f, r) for f, r in zip(frames, ref_frames)]
            psnr_mean = statistics.mean(min(p, 100.0) for p in frame_psnr)
            run = {
                "method": method, "label": f"{method} {threshold:g}", "kind": "xfuser", "threshold": threshold,
                "latency_s": latency, "baseline_latency_s": baseline_s, "speedup": baseline_s / latency,
                "psnr": [psnr_mean], "ssim": [statistics.mean(frame_ssim)],
                "rel_l2_latents": [relative_l2(latents, ref_latents)] if latents is not None and ref_latents is not None else None,
                "psnr_mean": psnr_mean, "ssim_mean": statistics.mean(frame_ssim), "lpips": None, "lpips_mean": None,
                "psnr_per_frame": frame_psnr, "ssim_per_frame": frame_ssim,
                "hit_ratio": stats["hit_ratio"], "compute_fraction": stats["compute_fraction"], "stats": stats,
                "peak_memory_bytes": bench.last_peak.bytes, "peak_memory_kind": bench.last_peak.kind,
                "cache_state_bytes": stats["cache_state_bytes"]["total"],
                "images": [bench.save(name, frames)],
            }
            (out_dir / f"{name}_stats.json").write_text(strict_json.dumps(stats, indent=2))
            report["runs"].append(run)
            logger.info("%s: %.2fx, PSNR %.2f dB (per frame %s), SSIM %.4f, hit %.2f", run["label"], run["speedup"], psnr_mean,
                        " ".join(f"{p:.1f}" for p in frame_psnr), run["ssim_mean"], run["hit_ratio"])
    path = out_dir / "results.json"
    path.write_text(strict_json.dumps(report, indent=2, default=str))
    logger.info("wrote %s", path)
    if args.report:
        from report import main as report_main

        report_main([str(path)])
    return 0


if __name__ == "__main__":
    from xfuser.cli import run_script  # bad input: one `error:` line, exit 2

    run_script(main)
