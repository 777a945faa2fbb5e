"""Requests that run but will disappoint get a warning before compute: a size far from the
model's native one, prompt words the tokenizer can only spell letter by letter."""
from __future__ import annotations

from unittest import mock

import pytest
import torch

from xfuser import xFuserFastCachePipelineWrapper
from xfuser.config.defaults import EMBEDDED_MODEL_DIR
from xfuser.model_executor.pipelines import input_warnings
from xfuser.model_executor.pipelines.input_warnings import far_from_native, unknown_words


@pytest.fixture(scope="module")
def pipe():
    from diffusers import PixArtSigmaPipeline

    pipe = PixArtSigmaPipeline.from_pretrained(EMBEDDED_MODEL_DIR)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_size_far_from_native_is_named_with_its_token_ratio(pipe):
    message = far_from_native(pipe, 512, 512)  # the embedded model is trained at 64 px
    assert message is not None and "native 64x64" in message and "64x its image tokens" in message
    assert far_from_native(pipe, 64, 64) is None and far_from_native(pipe, 96, 96) is None  # 2.25x: near
    assert "0.25x" in far_from_native(pipe, 32, 32)


def test_words_outside_the_vocabulary_are_found(pipe):
    words = unknown_words(pipe.tokenizer, "a photo of an astronaut riding a horse on the moon")
    assert {"astronaut", "horse", "moon"} <= set(words)
    assert unknown_words(pipe.tokenizer, "a red circle on a blue background, top left") == []


def test_the_wrapper_warns_once_before_compute(pipe):
    prompt = "an astronaut on a blue background"
    with mock.patch.object(input_warnings.logger, "warning") as warning, \
            xFuserFastCachePipelineWrapper(pipe) as wrapper:
        wrapper.enable_cache("None")
        for _ in range(2):
            wrapper(prompt=prompt, num_inference_steps=1, output_type="latent", generator=torch.Generator().manual_seed(0))
    lines = [call.args[0] % call.args[1:] for call in warning.call_args_list]
    about = [line for line in lines if "'astronaut'" in line]
    assert len(about) == 1 and prompt in about[0] and "calibration_prompts.txt" in about[0], lines
