#!/usr/bin/env python
"""Train xfuser's embedded default model: a tiny PixArt-Sigma text-to-image DiT on coloured shapes.

CPU only (two threads by default), fixed seeds.  Writes exactly what ships to
``assets/models/xfuser-shapes-pixart/`` (diffusers format, fp16 weights) plus
``training_log.json`` there.

Stages:
  1. tokenizer  - T5 (unigram) tokenizer built from an in-memory vocabulary of the caption grammar.
  2. text enc.  - small T5 encoder, initialised with a relative-position attention bias that makes
                  each head look at a fixed neighbouring token (word order), then trained jointly
                  with the DiT (``--frozen-text-encoder`` keeps it frozen, the earlier recipe).
  3. VAE        - ~0.7M-param AutoencoderKL, 4x downsampling, 4 latent channels, trained on the fly;
                  encoder frozen after ``--vae-enc-minutes`` (decoder keeps training).
                  ``--vae-from DIR`` reuses the VAE of an earlier run instead.
  4. DiT        - PixArtTransformer2DModel (8 blocks, hidden 128, patch 2, 16x16 latent = 64 tokens)
                  on precomputed posterior-mean latents; v-prediction (epsilon prediction left the
                  high-noise steps, where colour and layout are decided, badly wrong), min-SNR(5)
                  weighting, 10% caption dropout, LR warm-up then linear decay, EMA.  Checkpoints
                  (EMA weights) are written every few minutes so the run can be stopped at any time.

Usage:  python tools/train_default_model.py [--vae-minutes 11 --vae-enc-minutes 7 --dit-minutes 45]
Wall-time budgets make step counts machine dependent; pass ``--vae-steps/--dit-steps`` (the
counts are recorded in training_log.json) to reproduce a run exactly.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ----------------------------------------------------------------------------- config
CONFIG = {
    "seed": 0,
    "image_size": 64,
    "max_text_len": 16,
    "t5": dict(d_model=128, d_kv=32, num_heads=4, d_ff=256, num_layers=2,
               relative_attention_num_buckets=32, relative_attention_max_distance=64,
               feed_forward_proj="gated-gelu", dropout_rate=0.0),
    # head h attends to the token at this relative offset (bias added on that bucket)
    "t5_head_offsets": [-1, 1, -2, 2],
    "t5_offset_bias": 8.0,
    "vae": dict(in_channels=3, out_channels=3,
                down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
                block_out_channels=[16, 32, 64], layers_per_block=1, latent_channels=4,
                norm_num_groups=8, sample_size=64),
    "vae_batch": 16,
    "vae_lr": 1e-3,
    "vae_kl_weight": 1e-6,
    "n_latents": 8192,
    # hidden 128 = 4 heads x 32 (4 heads keep a 4-way Ulysses split possible): ~2.3M params, ~0.29 s
    # per step at batch 48 on 2 cores, so the budget buys ~10k steps (hidden 256 got ~4k).
    "dit": dict(num_attention_heads=4, attention_head_dim=32, in_channels=4, out_channels=4,
                num_layers=8, cross_attention_dim=128, caption_channels=128, sample_size=16,
                patch_size=2, norm_num_groups=32, attention_bias=True, activation_fn="gelu-approximate",
                num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False,
                norm_eps=1e-6, interpolation_scale=None, use_additional_conditions=False),
    "dit_batch": 48,
    "dit_lr": 1e-3,
    "dit_warmup": 200,
    "dit_lr_final_fraction": 0.1,  # linear decay to this fraction of dit_lr over the DiT budget
    # Train the text encoder jointly with the DiT (its own LR): a random frozen T5 only separates the
    # colour roles to cosine ~0.5, which the DiT learns to read far more slowly than a trained encoder.
    "train_text_encoder": True,
    "text_encoder_lr": 3e-4,
    "dit_weight_decay": 0.0,
    "min_snr_gamma": 5.0,
    "caption_dropout": 0.1,
    "ema_decay": 0.999,
    "scheduler": dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                      prediction_type="v_prediction", solver_order=2, algorithm_type="dpmsolver++",
                      lower_order_final=True, timestep_spacing="linspace"),
    "default_guidance_scale": 2.0,
    "checkpoint_every_s": 240,
}


from xfuser.testing import shapes as S  # noqa: E402  (the package is installed: pip install -e .)


def log(msg, fh=None):
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)


# ----------------------------------------------------------------------------- tokenizer / T5
def build_tokenizer():
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in S.WORDS]
    vocab += [(",", -1.0)]
    vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789.-'"]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def build_text_encoder(tokenizer, fix_order=True):
    from transformers import T5Config, T5EncoderModel
    from transformers.models.t5.modeling_t5 import T5Attention

    torch.manual_seed(CONFIG["seed"] + 1)
    vocab_size = int(math.ceil(len(tokenizer) / 8) * 8)
    cfg = T5Config(vocab_size=vocab_size, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                   is_encoder_decoder=False, use_cache=False, **CONFIG["t5"])
    model = T5EncoderModel(cfg).eval()
    if fix_order:
        att = model.encoder.block[0].layer[0].SelfAttention
        w = att.relative_attention_bias.weight
        with torch.no_grad():
            w.zero_()
            for h, off in enumerate(CONFIG["t5_head_offsets"][: cfg.num_heads]):
                b = T5Attention._relative_position_bucket(
                    torch.tensor(off), bidirectional=True, num_buckets=cfg.relative_attention_num_buckets,
                    max_distance=cfg.relative_attention_max_distance)
                w[int(b), h] = CONFIG["t5_offset_bias"]
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@torch.no_grad()
def encode_text(tokenizer, text_encoder, captions, max_len):
    tok = tokenizer(list(captions), padding="max_length", max_length=max_len, truncation=True,
                    add_special_tokens=True, return_tensors="pt")
    emb = text_encoder(tok.input_ids, attention_mask=tok.attention_mask)[0]
    return emb.float(), tok.attention_mask


@torch.no_grad()
def order_cosine(tokenizer, text_encoder):
    """How well the encoder separates "X shape on Y background" from "Y shape on X background".

    Returns (role_cosine, pooled_cosine): role_cosine is the cosine between the contextual
    embedding of the same colour word in the shape-colour slot vs. the background slot (what the
    DiT's order-free cross-attention has to tell apart); pooled_cosine compares mean-pooled
    caption embeddings.  A bag-of-words encoder gives ~1.0 for both.
    """
    pairs = [("red", "blue", "circle"), ("green", "white", "square"), ("yellow", "black", "triangle")]
    role, pooled_cos = [], []
    for c1, c2, shp in pairs:
        a, b = (f"a {c1} {shp} on a {c2} background, center", f"a {c2} {shp} on a {c1} background, center")
        e, m = encode_text(tokenizer, text_encoder, [a, b], CONFIG["max_text_len"])
        # token 1 is the shape colour, token 5 the background colour ("a X shape on a Y background")
        role.append(float(F.cosine_similarity(e[0, 1], e[1, 5], dim=0)))
        role.append(float(F.cosine_similarity(e[0, 5], e[1, 1], dim=0)))
        pooled = (e * m[..., None]).sum(1) / m.sum(1, keepdim=True)
        pooled_cos.append(float(F.cosine_similarity(pooled[0:1], pooled[1:2]).item()))
    return float(np.mean(role)), float(np.mean(pooled_cos))


# ----------------------------------------------------------------------------- VAE
def to_tensor(imgs):
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def frozen_encoder_latents(vae, x):
    """Decoder-phase inputs: the frozen encoder's posterior mean plus a little noise, so the
    decoder tolerates the imperfect latents a DiT produces."""
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
    return z + 0.05 * z.std() * torch.randn_like(z)


def train_vae(args, rng, tlog):
    from diffusers import AutoencoderKL

    torch.manual_seed(CONFIG["seed"] + 2)
    vae = AutoencoderKL(**CONFIG["vae"])
    n_params = sum(p.numel() for p in vae.parameters())
    log(f"VAE params: {n_params/1e6:.3f}M")
    opt = torch.optim.Adam(vae.parameters(), lr=CONFIG["vae_lr"])
    test_imgs, _ = S.sample_batch(256, np.random.default_rng(999), size=CONFIG["image_size"],
                                  captions=S.train_captions() + S.heldout_captions())
    test_x = to_tensor(test_imgs)
    t0 = time.time()
    step, enc_frozen, enc_steps = 0, False, None
    vae.train()
    while True:
        el = time.time() - t0
        if args.vae_steps is not None:
            if step >= args.vae_steps:
                break
            freeze_now = step >= args.vae_enc_steps
        else:
            if el > args.vae_minutes * 60:
                break
            freeze_now = el > args.vae_enc_minutes * 60
        if freeze_now and not enc_frozen:
            enc_frozen, enc_steps = True, step
            for m in (vae.encoder, vae.quant_conv):
                for p in m.parameters():
                    p.requires_grad_(False)
            opt = torch.optim.Adam([p for p in vae.parameters() if p.requires_grad], lr=CONFIG["vae_lr"] * 0.5)
            log(f"VAE: encoder frozen at step {step}")
        imgs, _ = S.sample_batch(CONFIG["vae_batch"], rng, size=CONFIG["image_size"])
        x = to_tensor(imgs)
        if enc_frozen:
            z = frozen_encoder_latents(vae, x)
            kl = torch.zeros(())
        else:
            post = vae.encode(x).latent_dist
            z = post.sample()
            kl = post.kl().mean()
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, x) + CONFIG["vae_kl_weight"] * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0:
            log(f"VAE step {step} loss {loss.item():.5f} ({time.time()-t0:.0f}s)")
        step += 1
    vae.eval()
    with torch.no_grad():
        rec = vae.decode(vae.encode(test_x).latent_dist.mean).sample
        mse = F.mse_loss(rec, test_x).item()
    tlog["vae"] = {"params": n_params, "steps": step, "encoder_frozen_at_step": enc_steps,
                   "seconds": round(time.time() - t0, 1), "final_train_loss": round(loss.item(), 6),
                   "heldout_mse_[-1,1]": round(mse, 6)}
    log(f"VAE done: {step} steps, held-out MSE {mse:.5f}")
    for p in vae.parameters():
        p.requires_grad_(False)
    return vae


def checker_rate_on_reconstructions(vae) -> float:
    """Pixel-checker pass rate on VAE reconstructions of every caption's canonical image: the
    ceiling the DiT's adherence can reach through this decoder."""
    from PIL import Image

    caps = S.train_captions() + S.heldout_captions()
    ok = []
    with torch.no_grad():
        for i in range(0, len(caps), 64):
            batch = caps[i:i + 64]
            x = to_tensor(np.stack([S.render_caption(c, size=CONFIG["image_size"]) for c in batch]))
            rec = vae.decode(vae.encode(x).latent_dist.mean).sample
            ims = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
            ok += [S.check_image(Image.fromarray(im), c)["ok"] for im, c in zip(ims, batch)]
    return float(np.mean(ok))


def finetune_decoder(vae, args, rng, tlog):
    """More decoder-only training on an existing VAE. The encoder (hence every latent the DiT was
    trained on) is untouched, so this only sharpens how latents are turned back into pixels; in a
    from-scratch run it is the same as a longer decoder phase (``--vae-minutes``)."""
    before = checker_rate_on_reconstructions(vae)
    dec = [p for m in (vae.decoder, vae.post_quant_conv) for p in m.parameters()]
    for p in dec:
        p.requires_grad_(True)
    opt = torch.optim.Adam(dec, lr=CONFIG["vae_lr"] * 0.25)
    vae.train()
    t0, step = time.time(), 0
    while time.time() - t0 < args.decoder_minutes * 60:
        x = to_tensor(S.sample_batch(CONFIG["vae_batch"], rng, size=CONFIG["image_size"])[0])
        loss = F.mse_loss(vae.decode(frozen_encoder_latents(vae, x)).sample, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 100 == 0:
            log(f"decoder step {step} loss {loss.item():.5f} ({time.time()-t0:.0f}s)")
    vae.eval()
    for p in dec:
        p.requires_grad_(False)
    after = checker_rate_on_reconstructions(vae)
    tlog["vae_decoder_finetune"] = {"steps": step, "seconds": round(time.time() - t0, 1),
                                    "final_loss": round(loss.item(), 6),
                                    "checker_on_reconstructions_before": round(before, 4),
                                    "checker_on_reconstructions_after": round(after, 4)}
    log(f"decoder fine-tune: {step} steps; checker on reconstructions {before:.3f} -> {after:.3f}")


# ----------------------------------------------------------------------------- saving
def save_pipeline(out, tokenizer, text_encoder, vae, transformer, tlog):
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline

    sched = DPMSolverMultistepScheduler(**CONFIG["scheduler"])
    # The T5 encoder stays fp32 (it is tiny): transformers loads it in its saved dtype, while diffusers
    # upcasts fp16 VAE/DiT weights to fp32, so a plain from_pretrained(path) gives an all-fp32 pipeline.
    pipe = PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=copy.deepcopy(text_encoder).float(),
                               vae=copy.deepcopy(vae).half(), transformer=copy.deepcopy(transformer).half(),
                               scheduler=sched)
    tmp = out + ".tmp"
    pipe.save_pretrained(tmp, safe_serialization=True)
    with open(os.path.join(tmp, "training_log.json"), "w") as f:
        json.dump(tlog, f, indent=2)
    # call defaults xfuser applies when it runs this model (read by pipelines/call_args.py)
    with open(os.path.join(tmp, "xfuser_defaults.json"), "w") as f:
        f.write(json.dumps({"guidance_scale": CONFIG["default_guidance_scale"]}) + "\n")
    if os.path.isdir(out):
        import shutil
        shutil.rmtree(out)
    os.replace(tmp, out)


# ----------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(REPO, "assets", "models", "xfuser-shapes-pixart"))
    ap.add_argument("--vae-minutes", type=float, default=11.0)
    ap.add_argument("--vae-enc-minutes", type=float, default=7.0)
    ap.add_argument("--dit-minutes", type=float, default=45.0, help="time budget of the DiT stage")
    ap.add_argument("--decoder-minutes", type=float, default=0.0,
                    help="extra decoder-only VAE training (encoder and latents unchanged); with --resume "
                         "--dit-minutes 0 it improves a shipped model's decoder without touching the DiT")
    ap.add_argument("--vae-steps", type=int, default=None, help="fixed VAE steps (overrides minutes)")
    ap.add_argument("--vae-enc-steps", type=int, default=None)
    ap.add_argument("--dit-steps", type=int, default=None, help="fixed DiT steps (overrides minutes)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vae-from", default=None,
                    help="reuse the VAE of this pipeline folder instead of training one (ablations)")
    ap.add_argument("--dit-lr", type=float, default=None, help="override CONFIG['dit_lr'] (ablations)")
    ap.add_argument("--dit-heads", type=int, default=None,
                    help="override the DiT width as heads x 64 (ablations)")
    ap.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default=None,
                    help="override the scheduler's prediction type (ablations)")
    ap.add_argument("--frozen-text-encoder", action="store_true",
                    help="keep the order-aware random T5 frozen (the earlier recipe; ablations)")
    ap.add_argument("--resume", action="store_true",
                    help="second stage: continue the DiT from the EMA weights in --out (VAE/T5 reused, "
                         "fresh optimizer, LR decays linearly to 10%% over --dit-minutes/--dit-steps)")
    ap.add_argument("--n-latents", type=int, default=None, help="override CONFIG['n_latents'] (smoke tests)")
    args = ap.parse_args()
    if args.vae_steps is not None and args.vae_enc_steps is None:
        args.vae_enc_steps = int(args.vae_steps * 0.65)

    torch.set_num_threads(args.threads)
    if args.n_latents is not None:
        CONFIG["n_latents"] = args.n_latents
    if args.dit_lr is not None:
        CONFIG["dit_lr"] = args.dit_lr
    if args.dit_heads is not None:
        CONFIG["dit"].update(num_attention_heads=args.dit_heads, attention_head_dim=64,
                             cross_attention_dim=64 * args.dit_heads)
    if args.prediction_type is not None:
        CONFIG["scheduler"]["prediction_type"] = args.prediction_type
    if args.frozen_text_encoder:
        CONFIG["train_text_encoder"] = False
    torch.manual_seed(CONFIG["seed"])
    rng = np.random.default_rng(CONFIG["seed"])
    T0 = time.time()
    tlog = {"config": CONFIG, "args": vars(args), "heldout_triples": S.heldout_triples(),
            "torch": torch.__version__}
    if args.resume:
        with open(os.path.join(args.out, "training_log.json")) as f:
            tlog = json.load(f)
        decoder_only = args.dit_steps == 0 if args.dit_steps is not None else args.dit_minutes <= 0
        tlog["args_decoder_finetune" if decoder_only else "args_resume"] = vars(args)

    # 1-2. tokenizer + text encoder
    tokenizer = build_tokenizer()
    te_random = build_text_encoder(tokenizer, fix_order=False)
    text_encoder = build_text_encoder(tokenizer, fix_order=True)
    (rb, pb), (ra, pa) = order_cosine(tokenizer, te_random), order_cosine(tokenizer, text_encoder)
    del te_random
    tlog["text_encoder"] = {**tlog.get("text_encoder", {}), "params": sum(p.numel() for p in text_encoder.parameters()),
                            "role_cosine_random_t5": round(rb, 4), "role_cosine_order_aware_t5": round(ra, 4),
                            "pooled_cosine_random_t5": round(pb, 4), "pooled_cosine_order_aware_t5": round(pa, 4)}
    log(f"T5 colour-role cosine: random {rb:.4f} -> order-aware {ra:.4f} (mean-pooled {pb:.4f} -> {pa:.4f})")

    # 3. VAE
    if args.resume or args.vae_from:
        from diffusers import AutoencoderKL

        src = args.out if args.resume else args.vae_from
        vae = AutoencoderKL.from_pretrained(os.path.join(src, "vae"), torch_dtype=torch.float32).eval()
        for p in vae.parameters():
            p.requires_grad_(False)
        if args.resume:
            rng = np.random.default_rng(CONFIG["seed"] + 10)
        else:  # keep the provenance of the reused VAE (its own training record)
            try:
                with open(os.path.join(src, "training_log.json")) as f:
                    tlog["vae"] = dict(json.load(f).get("vae", {}))
            except FileNotFoundError:
                tlog["vae"] = {}
            tlog["vae"]["reused_from_an_earlier_run"] = True
    else:
        vae = train_vae(args, rng, tlog)
    if args.decoder_minutes > 0:
        finetune_decoder(vae, args, np.random.default_rng(CONFIG["seed"] + 20), tlog)

    # precompute latents + caption token ids
    t1 = time.time()
    caps_train = S.train_captions()
    all_caps = caps_train + [""]
    tok = tokenizer(all_caps, padding="max_length", max_length=CONFIG["max_text_len"], truncation=True,
                    add_special_tokens=True, return_tensors="pt")
    ids_all, mask_all = tok.input_ids, tok.attention_mask
    empty_idx = len(all_caps) - 1
    lat_rng = np.random.default_rng(CONFIG["seed"] + 3)
    cap_idx = lat_rng.integers(0, len(caps_train), size=CONFIG["n_latents"])
    lats = []
    with torch.no_grad():
        for i in range(0, CONFIG["n_latents"], 256):
            ids = cap_idx[i:i + 256]
            imgs = np.stack([S.render_caption(caps_train[j], size=CONFIG["image_size"], rng=lat_rng) for j in ids])
            lats.append(vae.encode(to_tensor(imgs)).latent_dist.mean)
    lats = torch.cat(lats)
    scaling = float(1.0 / lats.std())
    if args.resume:  # keep the scale the DiT was trained with
        scaling = float(vae.config.scaling_factor)
    vae.register_to_config(scaling_factor=scaling)
    lats = lats * scaling
    cap_idx = torch.from_numpy(cap_idx)
    tlog["latents"] = {"n": int(lats.shape[0]), "scaling_factor": scaling, "seconds": round(time.time() - t1, 1),
                       "mean_after_scaling": float(lats.mean())}
    log(f"latents {tuple(lats.shape)} scaling_factor {scaling:.4f} ({time.time()-t1:.0f}s)")

    # 4. DiT (+ text encoder when it is trained jointly)
    from diffusers import DDPMScheduler, PixArtTransformer2DModel
    from transformers import T5EncoderModel

    train_te = CONFIG["train_text_encoder"]
    torch.manual_seed(CONFIG["seed"] + 4)
    dit = PixArtTransformer2DModel(**CONFIG["dit"])
    if args.resume:
        dit = PixArtTransformer2DModel.from_pretrained(os.path.join(args.out, "transformer"),
                                                       torch_dtype=torch.float32)
        text_encoder = T5EncoderModel.from_pretrained(os.path.join(args.out, "text_encoder"),
                                                      torch_dtype=torch.float32)
    dit.train()
    ema = copy.deepcopy(dit).eval()
    ema_te = copy.deepcopy(text_encoder).eval()
    for p in list(ema.parameters()) + list(ema_te.parameters()):
        p.requires_grad_(False)
    if train_te:
        text_encoder.train()
        for p in text_encoder.parameters():
            p.requires_grad_(True)
    else:
        with torch.no_grad():
            emb_all = text_encoder(ids_all, attention_mask=mask_all)[0].float()
    n_dit = sum(p.numel() for p in dit.parameters())
    log(f"DiT params: {n_dit/1e6:.3f}M (text encoder {'trained jointly' if train_te else 'frozen'})")
    noise_sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
    ac = noise_sched.alphas_cumprod.float()
    snr = ac / (1 - ac)
    v_pred = CONFIG["scheduler"]["prediction_type"] == "v_prediction"
    # min-SNR-gamma weighting, expressed for the target actually regressed (eps: /snr, v: /(snr+1))
    w_t = torch.clamp(snr, max=CONFIG["min_snr_gamma"]) / (snr + 1 if v_pred else snr)
    groups = [{"params": list(dit.parameters()), "base_lr": CONFIG["dit_lr"]}]
    if train_te:
        groups.append({"params": list(text_encoder.parameters()), "base_lr": CONFIG["text_encoder_lr"]})
    opt = torch.optim.AdamW(groups, lr=CONFIG["dit_lr"], weight_decay=CONFIG["dit_weight_decay"])
    trained = [p for gr in groups for p in gr["params"]]
    g = torch.Generator().manual_seed(CONFIG["seed"] + (15 if args.resume else 5))
    dkey = "dit_resume" if args.resume else "dit"
    previous_record = tlog.get(dkey)
    t2 = time.time()
    last_ckpt = t2
    step, losses = 0, []
    tlog[dkey] = {"params": n_dit, "tokens": (CONFIG["dit"]["sample_size"] // CONFIG["dit"]["patch_size"]) ** 2,
                  "text_encoder_trained": train_te}
    B = CONFIG["dit_batch"]
    warmup = 50 if args.resume else CONFIG["dit_warmup"]
    final = CONFIG["dit_lr_final_fraction"]
    budget_zero = args.dit_steps == 0 if args.dit_steps is not None else args.dit_minutes <= 0
    while not budget_zero:
        el = time.time() - t2
        frac = step / args.dit_steps if args.dit_steps is not None else el / (args.dit_minutes * 60)
        if frac >= 1.0:
            break
        scale = min(1.0, (step + 1) / warmup) * (1.0 - (1.0 - final) * frac)  # warm-up, then linear decay
        for gr in opt.param_groups:
            gr["lr"] = gr["base_lr"] * scale
        idx = torch.randint(0, lats.shape[0], (B,), generator=g)
        x0 = lats[idx]
        ci = cap_idx[idx].clone()
        drop = torch.rand(B, generator=g) < CONFIG["caption_dropout"]
        ci[drop] = empty_idx
        t = torch.randint(0, 1000, (B,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        a = ac[t].sqrt().view(B, 1, 1, 1)
        s = (1 - ac[t]).sqrt().view(B, 1, 1, 1)
        xt = a * x0 + s * noise
        emb = text_encoder(ids_all[ci], attention_mask=mask_all[ci])[0] if train_te else emb_all[ci]
        pred = dit(xt, encoder_hidden_states=emb, encoder_attention_mask=mask_all[ci], timestep=t,
                   added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
        target = a * noise - s * x0 if v_pred else noise
        per = ((pred - target) ** 2).mean(dim=(1, 2, 3))
        loss = (per * w_t[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        d = min(CONFIG["ema_decay"], (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(list(ema.parameters()) + list(ema_te.parameters()),
                             list(dit.parameters()) + list(text_encoder.parameters())):
                pe.lerp_(p, 1 - d)
        losses.append(loss.item())
        step += 1
        if step % 50 == 0:
            log(f"DiT step {step} loss(avg50) {np.mean(losses[-50:]):.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"({time.time()-t2:.0f}s, {(time.time()-t2)/step:.2f}s/step)")
        if time.time() - last_ckpt > CONFIG["checkpoint_every_s"]:
            tlog[dkey].update({"steps": step, "seconds": round(time.time() - t2, 1),
                                "final_loss_avg100": round(float(np.mean(losses[-100:])), 5)})
            save_pipeline(args.out, tokenizer, ema_te, vae, ema, tlog)
            last_ckpt = time.time()
            log(f"checkpoint saved at step {step}")
    if budget_zero:  # decoder-only pass: the DiT and text encoder are saved as loaded
        tlog.pop(dkey)
        if previous_record is not None:
            tlog[dkey] = previous_record
        tlog["total_seconds_decoder_finetune"] = round(time.time() - T0, 1)
        save_pipeline(args.out, tokenizer, ema_te, vae, ema, tlog)
        log(f"done in {time.time() - T0:.0f}s -> {args.out}")
        return
    tlog[dkey].update({"steps": step, "seconds": round(time.time() - t2, 1),
                        "final_loss_avg100": round(float(np.mean(losses[-100:])), 5),
                        "loss_curve_avg100": [round(float(np.mean(losses[i:i + 100])), 4)
                                              for i in range(0, len(losses), 100)]})
    if train_te:
        ra, pa = order_cosine(tokenizer, ema_te)
        tlog["text_encoder"].update({"role_cosine_trained_t5": round(ra, 4), "pooled_cosine_trained_t5": round(pa, 4)})
        log(f"trained T5 colour-role cosine {ra:.4f} (mean-pooled {pa:.4f})")
    tlog["total_seconds" + ("_resume" if args.resume else "")] = round(time.time() - T0, 1)
    save_pipeline(args.out, tokenizer, ema_te, vae, ema, tlog)
    log(f"done in {time.time() - T0:.0f}s -> {args.out}")


if __name__ == "__main__":
    main()
