"""Parallel runner: bad input fails before compute, decisions agree under adversarial metrics,
and the torchrun example works end to end with caching on."""
from __future__ import annotations

import json

import pytest
import torch

from xfuser import ConfigError, xFuserArgs
from xfuser.parallel import xDiTParallel
from xfuser.testing.multiprocess import run_on_ranks, run_torchrun
from xfuser.testing.tiny_pipelines import build_tiny_pipeline


@pytest.mark.parametrize(
    "model_type,args,world,fragment",
    [
        ("pixart-sigma", dict(ulysses_degree=3), 3, "not divisible by --ulysses_degree 3"),
        ("pixart-sigma", dict(ring_degree=3, height=32, width=32), 3, "not divisible by the sequence-parallel degree 3"),
        ("flux", dict(use_cfg_parallel=True, guidance_scale=3.5), 2, "does not use classifier-free guidance"),
        ("flux", dict(ulysses_degree=2, max_sequence_length=15), 2, "--max_sequence_length 15"),
        ("cogvideox", dict(pipefusion_parallel_degree=2), 2, "PipeFusion is not implemented for CogVideoXTransformer3DModel"),
    ],
)
def test_bad_parallel_input_fails_before_any_compute(model_type, args, world, fragment):
    pipe = build_tiny_pipeline(model_type)
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    engine, inputs = xFuserArgs(model="tiny", **args).create_config(world_size=world)
    with pytest.raises(ConfigError, match=fragment):
        xDiTParallel(pipe, engine, inputs)
    assert not calls


def _adversarial(rank: int, world: int, steps: int) -> dict:
    """Each rank perturbs its own tokens by a rank-dependent amount inside the block stack,
    so local change metrics straddle the threshold: rank 0 alone would always skip, rank 1
    alone never. Decisions must still be identical (they come from reduced metrics)."""
    pipe = build_tiny_pipeline("pixart-sigma")
    pipe.set_progress_bar_config(disable=True)
    engine, inputs = xFuserArgs(
        model="tiny", ulysses_degree=2, num_inference_steps=steps, height=32, width=32, max_sequence_length=16,
        cache_method="Fast", cache_ratio_threshold=0.3, motion_threshold=0.5, debug_cache_agreement=True,
        output_type="latent", guidance_scale=3.0,
    ).create_config(world_size=world)
    runner = xDiTParallel(pipe, engine, inputs)
    g = torch.Generator().manual_seed(100 + rank)

    def noise(module, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        scale = 0.0 if rank == 0 else 1.0
        hidden = hidden + scale * torch.randn(hidden.shape, generator=g)
        if "hidden_states" in kwargs:
            kwargs["hidden_states"] = hidden
            return args, kwargs
        return (hidden, *args[1:]), kwargs

    pipe.transformer.transformer_blocks[1].block.register_forward_pre_hook(noise, with_kwargs=True)
    runner(clean_caption=False)
    log = runner.manager.decision_log()
    return {"log": log, "decisions": sum(len(actions) for _, actions, _ in log)}


def test_adversarial_rank_dependent_metrics_never_split_decisions():
    run = run_on_ranks(_adversarial, 2, 60, timeout_s=300)
    a, b = run.results
    assert a["log"] == b["log"]
    assert a["decisions"] >= 200
    actions = "".join(s for _, s, _ in a["log"])
    assert len(set(actions)) > 1, "all decisions equal: the threshold did not straddle anything"


def test_torchrun_example_with_cache_on_4_ranks(tmp_path):
    from xfuser.testing.tiny_pipelines import save_tiny_pipeline

    model = save_tiny_pipeline("pixart-sigma", tmp_path / "model")
    out = tmp_path / "results"
    proc = run_torchrun(
        [
            "examples/pixartsigma_example.py", "--model", str(model), "--ulysses_degree", "2", "--use_cfg_parallel",
            "--guidance_scale", "3", "--cache_method", "Fast", "--num_inference_steps", "4", "--height", "32",
            "--width", "32", "--max_sequence_length", "16", "--output_dir", str(out), "--debug_cache_agreement",
        ],
        nproc_per_node=4,
        timeout_s=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    name = "pixart-sigma_dp1_cfg2_ulysses2_ring1_pp1_patch1_Fast"
    assert (out / f"{name}.png").exists()
    stats = json.loads((out / f"{name}_stats.json").read_text())
    assert stats["method"] == "Fast" and stats["num_steps"] == 4
    assert "latency" in proc.stderr + proc.stdout


def _decode(rank: int, world: int, parallel_vae: bool):
    pipe = build_tiny_pipeline("pixart-sigma")
    pipe.set_progress_bar_config(disable=True)
    engine, inputs = xFuserArgs(
        model="tiny", ulysses_degree=world, use_parallel_vae=parallel_vae, height=32, width=32, max_sequence_length=16,
        num_inference_steps=3, output_type="np", cache_method="Fb", cache_ratio_threshold=0.5,
    ).create_config(world_size=world)
    out = xDiTParallel(pipe, engine, inputs)(clean_caption=False)
    return torch.as_tensor(out.images)


def test_parallel_vae_decodes_the_same_image():
    plain = run_on_ranks(_decode, 2, False, timeout_s=120).results
    split = run_on_ranks(_decode, 2, True, timeout_s=120).results
    for image in split:
        assert image.shape == plain[0].shape
        assert (image - plain[0]).abs().max().item() <= 1e-5


def test_xfuser_pipeline_class_loads_a_saved_model_through_the_runner(tmp_path):
    from xfuser import xFuserPixArtSigmaPipeline
    from xfuser.testing.tiny_pipelines import save_tiny_pipeline

    model = save_tiny_pipeline("pixart-sigma", tmp_path / "m")
    engine, inputs = xFuserArgs(
        model=str(model), cache_method="Fb", cache_ratio_threshold=0.5, height=32, width=32,
        max_sequence_length=16, num_inference_steps=4, output_type="latent",
    ).create_config(world_size=1)
    from xfuser.core.distributed import destroy_distributed_environment

    try:
        runner = xFuserPixArtSigmaPipeline.from_pretrained(engine_config=engine, input_config=inputs)
        assert isinstance(runner, xDiTParallel)
        out = runner()
        assert out.images.shape == (1, 4, 16, 16)
        assert runner.get_cache_statistics()["num_steps"] == 4
    finally:
        destroy_distributed_environment()
