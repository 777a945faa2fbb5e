"""Tiny random pipelines: every family builds offline, runs, is deterministic and round-trips
through save_pretrained/from_pretrained bit-exactly (the other tests rely on all three)."""
from __future__ import annotations

import pytest
import torch

from xfuser.testing.tiny_pipelines import TINY_MODEL_TYPES, build_tiny_pipeline, save_tiny_pipeline, tiny_call_kwargs
from xfuser.testing.tokenizers import WORDS, build_bert_tokenizer, build_clip_tokenizer, build_t5_tokenizer

LATENT_SHAPES = {
    "pixart-sigma": (1, 4, 16, 16),
    "pixart-alpha": (1, 4, 128, 128),
    "flux": (1, 16, 16),  # packed: 16 tokens x (4 channels x 2x2)
    "hunyuandit": (1, 4, 8, 8),
    "cogvideox": (1, 3, 4, 8, 8),  # (batch, latent frames, channels, h, w)
    "cogvideox1.5": (1, 4, 4, 8, 8),  # 3 latent frames padded to 4 for the 2-frame temporal patches
    "consisid": (1, 3, 4, 8, 8),
    "stepvideo": (1, 3, 4, 8, 8),
}
VIDEO = {"cogvideox", "cogvideox1.5", "consisid", "stepvideo"}


def _run(pipe, model_type: str, **overrides) -> torch.Tensor:
    kwargs = tiny_call_kwargs(model_type)
    kwargs.update(overrides)
    out = pipe(**kwargs)
    x = out.frames if model_type in VIDEO else out.images
    return torch.as_tensor(x)


@pytest.fixture(scope="module", params=TINY_MODEL_TYPES)
def built(request):
    pipe = build_tiny_pipeline(request.param)
    pipe.set_progress_bar_config(disable=True)
    return request.param, pipe, _run(pipe, request.param)


def test_runs_with_finite_output_of_expected_shape(built):
    model_type, pipe, latents = built
    assert tuple(latents.shape) == LATENT_SHAPES[model_type]
    assert torch.isfinite(latents).all()
    # the decode path too: pixels in [0, 1] at the requested size (and frame count)
    kwargs = tiny_call_kwargs(model_type)
    pixels = _run(pipe, model_type, output_type="np")
    size = (kwargs["height"], kwargs["width"], 3)
    assert tuple(pixels.shape) == ((1, kwargs["num_frames"]) + size if model_type in VIDEO else (1,) + size)
    assert torch.isfinite(pixels).all() and pixels.min() >= 0 and pixels.max() <= 1


def test_same_seed_same_output(built):
    model_type, pipe, reference = built
    assert torch.equal(_run(pipe, model_type), reference)
    again = build_tiny_pipeline(model_type, seed=0)
    again.set_progress_bar_config(disable=True)
    assert torch.equal(_run(again, model_type), reference)
    other = build_tiny_pipeline(model_type, seed=1).transformer.state_dict()
    assert any(not torch.equal(v, other[k]) for k, v in pipe.transformer.state_dict().items())


def test_save_and_reload_offline_is_exact(built, tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_type, pipe, reference = built
    path = save_tiny_pipeline(model_type, tmp_path / model_type)
    # StepVideoPipeline is ours, not diffusers': only its own class can name it in model_index.json
    loaders = (type(pipe),) if model_type == "stepvideo" else (DiffusionPipeline, type(pipe))
    for loader in loaders:
        loaded = loader.from_pretrained(path)
        assert type(loaded) is type(pipe)
        loaded.set_progress_bar_config(disable=True)
        assert torch.equal(_run(loaded, model_type), reference), f"{loader.__name__}.from_pretrained changed the output"


def test_unknown_model_type_is_rejected():
    with pytest.raises(ValueError, match="unknown tiny model type"):
        build_tiny_pipeline("sd3")
    with pytest.raises(ValueError, match="unknown tiny model type"):
        tiny_call_kwargs("sd3")


@pytest.mark.parametrize("build", [build_t5_tokenizer, build_clip_tokenizer, build_bert_tokenizer])
def test_tokenizers_whole_words_fallback_and_round_trip(build, tmp_path):
    from transformers import AutoTokenizer

    tok = build()
    for word in WORDS:
        assert len(tok.tokenize(word)) == 1, (word, tok.tokenize(word))
    prompt = "A photo of a zebra, 42 dogs; top-left!"
    assert tok.unk_token not in tok.tokenize(prompt)  # characters, digits, punctuation fall back, never to unknown
    ids = tok(prompt).input_ids
    assert max(ids) < 256  # the tiny text encoders' vocabulary
    tok.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)(prompt).input_ids == ids
