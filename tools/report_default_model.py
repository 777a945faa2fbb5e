#!/usr/bin/env python
"""Compute the numbers in docs/default_model.md for the embedded default model.

  OMP_NUM_THREADS=1 python tools/report_default_model.py [--n 60] [--skip-sweep]

Writes ``assets/default_model_grid.png`` and ``assets/models/xfuser-shapes-pixart/report.json``
and prints a markdown summary.  Everything runs on CPU with one thread and fixed seeds.
"""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(REPO, "assets", "models", "xfuser-shapes-pixart")
GRID = os.path.join(REPO, "assets", "default_model_grid.png")
SIZE = 64
STEPS = 20


from xfuser.testing import shapes as S  # noqa: E402  (the package is installed: pip install -e .)


def load_pipe(path=MODEL):
    from diffusers import PixArtSigmaPipeline

    pipe = PixArtSigmaPipeline.from_pretrained(path, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompts, seeds, guidance, steps=STEPS):
    out = []
    for p, s in zip(prompts, seeds):
        img = pipe(p, height=SIZE, width=SIZE, num_inference_steps=steps, guidance_scale=guidance,
                   use_resolution_binning=False, generator=torch.Generator().manual_seed(int(s))).images[0]
        out.append(img)
    return out


def prompt_set(captions, n, seed):
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(captions))
    prompts = [captions[order[i % len(order)]] for i in range(n)]
    return prompts, list(range(1000 + seed, 1000 + seed + n))


def adherence(pipe, prompts, seeds, guidance):
    imgs = generate(pipe, prompts, seeds, guidance)
    res = [S.check_image(im, p) for im, p in zip(imgs, prompts)]
    keys = ["bg_ok", "color_ok", "position_ok", "shape_ok", "ok"]
    return {k: round(float(np.mean([r[k] for r in res])), 3) for k in keys}, imgs


@torch.no_grad()
def block0_step_change(pipe, prompt, seed, guidance):
    """Per-step relative L1 change of transformer block 0's residual (output - input)."""
    block = pipe.transformer.transformer_blocks[0]
    resid = []

    def hook(mod, args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]
        resid.append((output - x).detach().clone())

    h = block.register_forward_hook(hook, with_kwargs=True)
    try:
        generate(pipe, [prompt], [seed], guidance)
    finally:
        h.remove()
    ch = []
    for a, b in zip(resid[:-1], resid[1:]):
        ch.append(float((b - a).abs().mean() / a.abs().mean().clamp_min(1e-12)))
    return ch


def make_grid(imgs, caps, path, scale=2):
    from PIL import Image, ImageDraw, ImageFont

    cols = 6
    rows = (len(imgs) + cols - 1) // cols
    cell, text_h = SIZE * scale, 30
    pad = 6
    W = cols * (cell + pad) + pad
    H = rows * (cell + text_h + pad) + pad
    canvas = Image.new("RGB", (W, H), (128, 128, 128))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for i, (im, c) in enumerate(zip(imgs, caps)):
        r, k = divmod(i, cols)
        x, y = pad + k * (cell + pad), pad + r * (cell + text_h + pad)
        canvas.paste(im.resize((cell, cell), Image.NEAREST), (x, y))
        p = S.parse_caption(c)
        draw.text((x, y + cell + 2), f"{p['color']} {p['shape']}", fill=(0, 0, 0), font=font)
        draw.text((x, y + cell + 15), f"on {p['bg']}, {p['position']}", fill=(0, 0, 0), font=font)
    canvas.save(path)


def dir_size(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=60, help="prompts per adherence set")
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--sweep", type=float, nargs="*", default=[1.0, 2.0, 3.0, 4.5])
    ap.add_argument("--sweep-n", type=int, default=24)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from diffusers import PixArtTransformer2DModel

    rep = {}
    pipe = load_pipe()
    tr = pipe.transformer
    rep["params"] = {n: sum(p.numel() for p in getattr(pipe, n).parameters())
                     for n in ("transformer", "vae", "text_encoder")}
    rep["tokens"] = (tr.config.sample_size // tr.config.patch_size) ** 2
    rep["disk_bytes"] = dir_size(MODEL)

    # timing (after one warm-up)
    p0 = "a red circle on a blue background, center"
    generate(pipe, [p0], [0], args.guidance)
    t = time.time()
    for s in range(3):
        generate(pipe, [p0], [s], args.guidance)
    rep["seconds_per_image_20_steps"] = round((time.time() - t) / 3, 3)

    # guidance sweep on training prompts
    sp, ss = prompt_set(S.train_captions(), args.sweep_n, seed=7)
    rep["guidance_sweep_train"] = {}
    for g in args.sweep:
        rep["guidance_sweep_train"][str(g)] = adherence(pipe, sp, ss, g)[0]
        print("sweep", g, rep["guidance_sweep_train"][str(g)], flush=True)

    # adherence: training vs held-out combinations
    tp, ts = prompt_set(S.train_captions(), args.n, seed=1)
    hp, hs = prompt_set(S.heldout_captions(), args.n, seed=2)
    rep["adherence_train"], timgs = adherence(pipe, tp, ts, args.guidance)
    rep["adherence_heldout"], himgs = adherence(pipe, hp, hs, args.guidance)
    print("train", rep["adherence_train"], "heldout", rep["adherence_heldout"], flush=True)

    # grid: 18 training + 6 held-out prompts (first of each set, not cherry-picked)
    make_grid(timgs[:18] + himgs[:6], tp[:18] + hp[:6], GRID)

    # block-0 residual step change: trained vs random weights (same architecture)
    trained = [block0_step_change(pipe, p, 100 + i, args.guidance) for i, p in enumerate(tp[:4])]
    torch.manual_seed(0)
    pipe.transformer = PixArtTransformer2DModel.from_config(tr.config).eval()
    rand = [block0_step_change(pipe, p, 100 + i, args.guidance) for i, p in enumerate(tp[:4])]
    rep["block0_rel_l1_change_trained"] = [round(float(x), 4) for x in np.mean(trained, axis=0)]
    rep["block0_rel_l1_change_random"] = [round(float(x), 4) for x in np.mean(rand, axis=0)]

    with open(os.path.join(MODEL, "report.json"), "w") as f:
        json.dump(rep, f, indent=2)
    print(json.dumps(rep, indent=1))


if __name__ == "__main__":
    main()
