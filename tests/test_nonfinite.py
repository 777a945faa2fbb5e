"""NaN/Inf hidden states stop the generation with the step and the block, on every rank."""
from __future__ import annotations

import pytest
import torch

from xfuser.model_executor.cache.manager import NonFiniteError
from xfuser.seeding import sample_generators
from xfuser.testing.multiprocess import run_on_ranks


def _pipe_and_kwargs():
    from xfuser.testing.tiny_pipelines import build_tiny_pipeline, tiny_call_kwargs

    pipe = build_tiny_pipeline("pixart-sigma")
    pipe.set_progress_bar_config(disable=True)
    kwargs = tiny_call_kwargs("pixart-sigma")
    kwargs.pop("generator")
    return pipe, kwargs


def _poison_block(pipe, index: int) -> None:
    block = pipe.transformer.transformer_blocks[index]
    block = getattr(block, "block", block)
    with torch.no_grad():
        block.ff.net[2].weight[0, 0] = float("nan")


@pytest.mark.parametrize("method", ["None", "Fb", "Fast"])
def test_nan_weights_name_the_step_and_block(method):
    from xfuser import xFuserFastCachePipelineWrapper

    pipe, kwargs = _pipe_and_kwargs()
    _poison_block(pipe, 2)
    calls = []
    pipe.vae.register_forward_pre_hook(lambda *a: calls.append(1))
    with xFuserFastCachePipelineWrapper(pipe) as wrapper:
        wrapper.enable_cache(method)
        with pytest.raises(NonFiniteError, match=r"step 0 .*output of block 2 of 4"):
            wrapper(**kwargs, generator=sample_generators(0, 1))
    assert not calls, "the VAE decoded a NaN latent"


def test_nan_latents_name_the_input():
    from xfuser import xFuserFastCachePipelineWrapper

    pipe, kwargs = _pipe_and_kwargs()
    latents = torch.randn(1, 4, 4, 4)
    latents[0, 0, 0, 0] = float("inf")
    with xFuserFastCachePipelineWrapper(pipe) as wrapper:
        wrapper.enable_cache("Fb")
        with pytest.raises(NonFiniteError, match="input of block 0"):
            wrapper(**kwargs, latents=latents)


def test_finite_run_is_untouched():
    from xfuser import xFuserFastCachePipelineWrapper

    pipe, kwargs = _pipe_and_kwargs()
    with xFuserFastCachePipelineWrapper(pipe) as wrapper:
        wrapper.enable_cache("Fb")
        out = wrapper(**kwargs, generator=sample_generators(0, 1)).images
    assert torch.isfinite(out).all()


def _usp_worker(rank: int, world: int) -> str:
    from xfuser import xFuserArgs
    from xfuser.parallel import xDiTParallel

    pipe, kwargs = _pipe_and_kwargs()
    engine, inputs = xFuserArgs(
        model="tiny", prompt=[kwargs["prompt"]], num_inference_steps=2, output_type="latent", height=32, width=32,
        guidance_scale=3.0, max_sequence_length=16, ulysses_degree=2, cache_method="Fb", collective_timeout=30,
    ).create_config(world_size=world)
    runner = xDiTParallel(pipe, engine, inputs)
    # NaN in the tokens of rank 1 only: rank 0's own states stay finite
    index = runner.manager.adapter.blocks(pipe.transformer)
    block = index[1][0][index[1][1]].block

    def poison(module, args, output):
        if rank == 1:
            output = output.clone()
            output[0, 0, 0] = float("nan")
        return output

    block.register_forward_hook(poison)
    try:
        runner()
    except NonFiniteError as exc:
        return str(exc)
    return "no error"


def test_nan_on_one_sequence_rank_stops_every_rank():
    run = run_on_ranks(_usp_worker, 2, timeout_s=120)
    for message in run.results:
        assert "output of block 1 of 4" in message, message
