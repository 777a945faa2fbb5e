"""tools/train_default_model.py writes a loadable pipeline, and its decoder-only pass
(``--resume --dit-minutes 0 --decoder-minutes M``) changes the VAE decoder and nothing else: the
DiT, the text encoder and the VAE encoder (hence every latent the DiT learned) stay bit-identical.
A few steps on 256 latents, one thread; about 40 s.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "tools", "train_default_model.py")


def _run(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    subprocess.run([sys.executable, SCRIPT, "--threads", "1", "--n-latents", "256", *args],
                   check=True, env=env, timeout=600, capture_output=True)


def _weights(path):
    from safetensors.torch import load_file

    return load_file(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("train") / "model")
    _run("--out", out, "--vae-steps", "3", "--dit-steps", "3")
    return out


def test_writes_a_loadable_v_prediction_pipeline(trained):
    from diffusers import PixArtSigmaPipeline

    pipe = PixArtSigmaPipeline.from_pretrained(trained)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.transformer.config.num_layers == 8
    with open(os.path.join(trained, "xfuser_defaults.json")) as f:
        assert json.load(f)["guidance_scale"] == 2.0
    log = json.load(open(os.path.join(trained, "training_log.json")))
    assert log["dit"]["steps"] == 3 and log["dit"]["text_encoder_trained"] is True


@pytest.mark.slow  # 25 s: a second training pass; the recipe's main pass is tested above
def test_decoder_only_pass_touches_only_the_decoder(trained):
    files = {"dit": "transformer/diffusion_pytorch_model.safetensors", "te": "text_encoder/model.safetensors",
             "vae": "vae/diffusion_pytorch_model.safetensors"}
    before = {k: _weights(os.path.join(trained, v)) for k, v in files.items()}
    _run("--out", trained, "--resume", "--dit-minutes", "0", "--decoder-minutes", "0.02")
    after = {k: _weights(os.path.join(trained, v)) for k, v in files.items()}
    for part in ("dit", "te"):
        assert all(torch.equal(before[part][n], after[part][n]) for n in before[part]), part
    encoder = [n for n in before["vae"] if n.startswith(("encoder.", "quant_conv."))]
    decoder = [n for n in before["vae"] if n.startswith(("decoder.", "post_quant_conv."))]
    assert encoder and decoder
    assert all(torch.equal(before["vae"][n], after["vae"][n]) for n in encoder)
    assert any(not torch.equal(before["vae"][n], after["vae"][n]) for n in decoder)
    log = json.load(open(os.path.join(trained, "training_log.json")))
    assert log["dit"]["steps"] == 3, "the DiT's training record survives the decoder pass"
    assert log["vae_decoder_finetune"]["steps"] > 0
