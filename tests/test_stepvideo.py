"""StepVideo: the official checkpoint layout loads, the tiny pipeline runs, every cache method
is exact at threshold 0 and caches above it, and sequence parallel equals one process."""
from __future__ import annotations

import inspect
import json

import pytest
import torch
from safetensors.torch import save_file

from xfuser import xFuserFastCachePipelineWrapper
from xfuser.model_executor.cache.adapters import adapter_for
from xfuser.model_executor.cache.adapters.stepvideo import StepVideoAdapter  # importing registers it
from xfuser.model_executor.models.stepvideo.pipeline import StepVideoPipeline
from xfuser.model_executor.models.stepvideo.transformer import StepVideoTransformer3DModel, apply_rope_3d, rope_3d_table
from xfuser.testing.multiprocess import run_on_ranks
from xfuser.testing.tiny_stepvideo import (
    TINY_STEPVIDEO_CONFIG,
    build_tiny_stepvideo_pipeline,
    build_tiny_stepvideo_transformer,
    tiny_stepvideo_call_kwargs,
)

STEPS = 5


def official_state_dict_names(num_layers: int, clip_projection: bool = True) -> set[str]:
    """Parameter names of the reference ``StepVideoModel`` (stepvideo/modules/model.py, blocks.py,
    normalization.py) for ``use_additional_conditions=False``, ``norm_elementwise_affine=False``:
    ``norm_out`` and ``caption_norm`` then hold no parameters."""
    names = {
        "pos_embed.proj.weight", "pos_embed.proj.bias", "scale_shift_table", "proj_out.weight", "proj_out.bias",
        "adaln_single.emb.timestep_embedder.linear_1.weight", "adaln_single.emb.timestep_embedder.linear_1.bias",
        "adaln_single.emb.timestep_embedder.linear_2.weight", "adaln_single.emb.timestep_embedder.linear_2.bias",
        "adaln_single.linear.weight", "adaln_single.linear.bias",
        "caption_projection.linear_1.weight", "caption_projection.linear_1.bias",
        "caption_projection.linear_2.weight", "caption_projection.linear_2.bias",
    }
    if clip_projection:
        names |= {"clip_projection.weight", "clip_projection.bias"}
    block = (
        "norm1.weight", "norm1.bias", "attn1.wqkv.weight", "attn1.wo.weight", "attn1.q_norm.weight", "attn1.k_norm.weight",
        "norm2.weight", "norm2.bias", "attn2.wq.weight", "attn2.wkv.weight", "attn2.wo.weight", "attn2.q_norm.weight",
        "attn2.k_norm.weight", "ff.net.0.proj.weight", "ff.net.2.weight", "scale_shift_table",
    )
    names |= {f"transformer_blocks.{i}.{n}" for i in range(num_layers) for n in block}
    return names


def _inputs(batch: int = 2, frames: int = 3, size: int = 8, text: int = 6, clip: int = 5, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, clip + text, dtype=torch.long)
    mask[0, clip + 4:] = 0  # a shorter first prompt: exercises the text mask
    return dict(
        hidden_states=torch.randn(batch, frames, 4, size, size, generator=g),
        encoder_hidden_states=torch.randn(batch, text, 32, generator=g),
        encoder_hidden_states_2=torch.randn(batch, clip, 32, generator=g),
        encoder_attention_mask=mask,
        timestep=torch.tensor([0.9, 0.3])[:batch],
    )


# ---------------------------------------------------------------------------- checkpoint layout
def test_tiny_state_dict_has_official_names_and_round_trips(tmp_path):
    model = build_tiny_stepvideo_transformer()
    assert set(model.state_dict()) == official_state_dict_names(2)
    model.save_pretrained(tmp_path)
    loaded = StepVideoTransformer3DModel.from_pretrained(tmp_path).eval()
    assert set(loaded.state_dict()) == official_state_dict_names(2)
    with torch.no_grad():
        a = model(**_inputs()).sample
        b = loaded(**_inputs()).sample
    assert a.shape == (2, 3, 4, 8, 8)
    assert torch.equal(a, b)


def test_official_folder_layout_loads_strictly(tmp_path):
    """config.json as the official checkpoint writes it (class StepVideoModel, its keys) and
    weights sharded with an index, all keys from the reference's naming."""
    config = {"_class_name": "StepVideoModel", "_diffusers_version": "0.31.0", "dropout": 0.0, "norm_type": "ada_norm_single",
              "norm_elementwise_affine": False, "norm_eps": 1e-6, "use_additional_conditions": False, **TINY_STEPVIDEO_CONFIG}
    (tmp_path / "config.json").write_text(json.dumps(config))
    source = build_tiny_stepvideo_transformer(seed=5).state_dict()
    names = sorted(official_state_dict_names(2))
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": names[::2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: source[k].contiguous() for k in keys}, str(tmp_path / file))
        weight_map.update({k: file for k in keys})
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    model, info = StepVideoTransformer3DModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert all(torch.equal(model.state_dict()[k], source[k]) for k in names)


def test_official_config_builds_the_30b_model_on_meta():
    with torch.device("meta"):
        model = StepVideoTransformer3DModel()  # defaults = the official config.json
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert set(shapes) == official_state_dict_names(48)
    assert shapes["transformer_blocks.0.attn1.wqkv.weight"] == (3 * 6144, 6144)
    assert shapes["transformer_blocks.0.attn2.wkv.weight"] == (2 * 6144, 6144)
    assert shapes["transformer_blocks.0.attn1.q_norm.weight"] == (128,)
    assert shapes["transformer_blocks.0.ff.net.0.proj.weight"] == (4 * 6144, 6144)
    assert shapes["caption_projection.linear_1.weight"] == (6144, 6144)
    assert shapes["clip_projection.weight"] == (6144, 1024)
    assert shapes["pos_embed.proj.weight"] == (6144, 64, 1, 1)
    assert shapes["proj_out.weight"] == (64, 6144)
    assert 29e9 < sum(p.numel() for p in model.parameters()) < 31e9  # "30B parameters"


def test_additional_conditions_and_single_timestep():
    torch.manual_seed(0)
    model = StepVideoTransformer3DModel(**{**TINY_STEPVIDEO_CONFIG, "use_additional_conditions": True}).eval()
    assert {"adaln_single.emb.resolution_embedder.linear_1.weight", "adaln_single.emb.nframe_embedder.linear_1.weight",
            "adaln_single.emb.fps_embedder.linear_1.weight"} <= set(model.state_dict())
    kwargs = _inputs(batch=1)
    with torch.no_grad():
        out = model(**kwargs, fps=torch.tensor([25.0]), return_dict=False)[0]
    assert out.shape == (1, 3, 4, 8, 8) and torch.isfinite(out).all()


def test_token_subset_rows_equal_the_full_block():
    """Queries of a token subset attend to every token, so their rows equal the full block's."""
    model = build_tiny_stepvideo_transformer()
    captured = {}
    block = model.transformer_blocks[0]
    block.register_forward_pre_hook(lambda m, a, kw: captured.update(kw), with_kwargs=True)
    with torch.no_grad():
        model(**_inputs())
        full = block(**captured)
        index = torch.tensor([0, 5, 17, 40, 47])
        part = block.forward_token_subset(index, **captured)
    assert torch.allclose(part[:, index], full[:, index], rtol=1e-5, atol=1e-6)
    rest = torch.ones(full.shape[1], dtype=torch.bool)
    rest[index] = False
    assert torch.equal(part[:, rest], captured["hidden_states"][:, rest])


def test_rope_axes_and_relative_positions():
    """Head channels [0, D/2) rotate with the frame, [D/2, 3D/4) with the row, the rest with the
    column (the reference's [64, 32, 32] split at D = 128); q.k depends on position differences only."""
    split = (8, 4, 4)
    f, h, w = 3, 4, 5
    cos, sin = rope_3d_table(f, h, w, split)
    grid = torch.stack(torch.meshgrid(torch.arange(f), torch.arange(h), torch.arange(w), indexing="ij"), -1).reshape(-1, 3)
    x = torch.randn(1, 1, 1, 16).expand(1, f * h * w, 1, 16)
    y = apply_rope_3d(x, (cos, sin), split)[0, :, 0]
    for axis, (lo, hi) in enumerate([(0, 8), (8, 12), (12, 16)]):
        same = grid[:, axis] == grid[0, axis]  # tokens sharing token 0's coordinate on this axis
        assert torch.allclose(y[same, lo:hi], y[0, lo:hi].expand(int(same.sum()), -1), atol=1e-6)
        assert not torch.allclose(y[~same, lo:hi], y[0, lo:hi].expand(int((~same).sum()), -1), atol=1e-3)
    q, k = (apply_rope_3d(torch.randn(1, 1, 1, 16).expand(1, f * h * w, 1, 16), (cos, sin), split)[0, :, 0] for _ in range(2))
    scores = q @ k.T
    index = lambda a, b, c: (a * h + b) * w + c  # noqa: E731
    assert torch.allclose(scores[index(0, 1, 2), index(1, 0, 4)], scores[index(1, 2, 1), index(2, 1, 3)], atol=1e-5)


def test_adapter_is_registered_for_the_model():
    assert isinstance(adapter_for(build_tiny_stepvideo_transformer()), StepVideoAdapter)


# ---------------------------------------------------------------------------- pipeline
@pytest.fixture(scope="module")
def pipe():
    pipe = build_tiny_stepvideo_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _frames(runner, **overrides):
    kwargs = tiny_stepvideo_call_kwargs()
    kwargs.update(overrides)
    return runner(**kwargs).frames


def test_pipeline_shapes_and_determinism(pipe):
    a, b = _frames(pipe), _frames(pipe)
    assert a.shape == (1, 3, 4, 8, 8)  # 9 frames -> 3 latent frames, 32 px -> 8 px latents
    assert torch.isfinite(a).all() and torch.equal(a, b)
    assert not torch.equal(a, _frames(pipe, generator=torch.Generator().manual_seed(1)))
    video = _frames(pipe, output_type="np")
    assert video.shape == (1, 9, 32, 32, 3) and 0.0 <= video.min() and video.max() <= 1.0
    no_cfg = _frames(pipe, guidance_scale=1.0)
    assert no_cfg.shape == a.shape and not torch.equal(no_cfg, a)


def test_pipeline_save_and_reload(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    loaded = StepVideoPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.transformer, StepVideoTransformer3DModel)
    assert torch.equal(_frames(loaded), _frames(pipe))


@pytest.fixture(scope="module")
def reference(pipe):
    return _frames(pipe, num_inference_steps=STEPS)


@pytest.mark.parametrize("method", ["Fb", "Tea", "Fast"])
def test_threshold_zero_reproduces_uncached(pipe, reference, method):
    wrapper = xFuserFastCachePipelineWrapper(pipe)
    # motion_threshold 0: FastCache's token reduction off too (it is not a threshold-0 no-op)
    wrapper.enable_cache(method, cache_ratio_threshold=0.0, motion_threshold=0.0)
    try:
        out = _frames(wrapper, num_inference_steps=STEPS)
        stats = wrapper.get_cache_statistics()
    finally:
        wrapper.disable_cache()
    assert ((out - reference).norm() / reference.norm()).item() <= 1e-5
    assert stats["family"] == "stepvideo" and stats["num_steps"] == STEPS and stats["hit_ratio"] == 0.0


@pytest.mark.parametrize("method,knobs", [
    ("Fb", dict(cache_ratio_threshold=5.0)),
    ("Tea", dict(cache_ratio_threshold=5.0)),
    ("Fast", dict(cache_ratio_threshold=5.0, motion_threshold=0.5)),
])
def test_large_threshold_reuses_steps(pipe, method, knobs):
    wrapper = xFuserFastCachePipelineWrapper(pipe).enable_cache(method, **knobs)
    try:
        out = _frames(wrapper, num_inference_steps=STEPS)
        stats = wrapper.get_cache_statistics()
    finally:
        wrapper.disable_cache()
    assert torch.isfinite(out).all()
    assert stats["hit_ratio"] > 0, [s["actions"] for s in stats["per_step"]]
    assert stats["per_step"][-1]["actions"] == "C" * stats["num_blocks"]


def test_fastcache_token_reduction_runs_partial_blocks(pipe, reference):
    wrapper = xFuserFastCachePipelineWrapper(pipe).enable_cache("Fast", cache_ratio_threshold=1e-6, motion_threshold=1.0)
    try:
        out = _frames(wrapper, num_inference_steps=STEPS)
        actions = "".join(s["actions"] for s in wrapper.get_cache_statistics()["per_step"])
    finally:
        wrapper.disable_cache()
    assert "P" in actions, actions
    assert torch.isfinite(out).all() and ((out - reference).norm() / reference.norm()).item() < 1.0


# ---------------------------------------------------------------------------- sequence parallel
METHODS = {
    "None": dict(cache_method="None"),
    "Fb": dict(cache_method="Fb", cache_ratio_threshold=0.6),
    "Tea": dict(cache_method="Tea", cache_ratio_threshold=0.8),
    "Fast": dict(cache_method="Fast", cache_ratio_threshold=0.5, motion_threshold=0.5),
}
SP_STEPS = 6


def _engine(method: dict, world: int, **parallel):
    from xfuser import xFuserArgs

    kwargs = tiny_stepvideo_call_kwargs()
    return xFuserArgs(
        model="tiny", prompt=[kwargs["prompt"]], num_inference_steps=SP_STEPS, seed=7, output_type="latent",
        height=kwargs["height"], width=kwargs["width"], guidance_scale=kwargs["guidance_scale"],
        max_sequence_length=kwargs["max_sequence_length"], cache_warmup_steps=1, debug_cache_agreement=True,
        **parallel, **method,
    ).create_config(world_size=world)


PARALLEL = {"ulysses2": dict(ulysses_degree=2), "ring2": dict(ring_degree=2), "cfg2": dict(use_cfg_parallel=True)}


def _parallel_worker(rank: int, world: int) -> dict:
    """Every parallel configuration in turn on the same 2 ranks (the ranks' imports dominate
    the cost, so one spawn serves all three); fresh pipeline and groups per configuration."""
    from xfuser.core.attention.usp import usp_attention
    from xfuser.core.distributed import destroy_model_parallel
    from xfuser.parallel import xDiTParallel

    results: dict = {}
    for config, parallel in PARALLEL.items():
        pipe = build_tiny_stepvideo_pipeline()
        pipe.set_progress_bar_config(disable=True)
        block0 = pipe.transformer.transformer_blocks[0]
        seen = []

        def record(module, args, kwargs, seen=seen):
            bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
            seen.append((bound["hidden_states"].shape[1], bound["rotary_emb"][0].shape[0]))

        block0.register_forward_pre_hook(record, with_kwargs=True)
        runner, per_method = None, {}
        for name, method in METHODS.items():
            engine, inputs = _engine(method, world, **parallel)
            if runner is None:
                runner = xDiTParallel(pipe, engine, inputs)
            else:
                runner.inputs = inputs
                runner.enable_cache(engine.cache_config)
            assert isinstance(runner.adapter, StepVideoAdapter)
            out = runner(num_frames=9)
            per_method[name] = {"latents": out.frames.clone(), "log": runner.manager.decision_log()}
        per_method["local_rows"] = sorted(set(seen))
        per_method["usp"] = block0.attn1.attention_core is usp_attention
        results[config] = per_method
        destroy_model_parallel()
    return results


def _single_process() -> dict:
    pipe = build_tiny_stepvideo_pipeline()
    pipe.set_progress_bar_config(disable=True)
    wrapper = xFuserFastCachePipelineWrapper(pipe)
    out = {}
    for name, method in METHODS.items():
        engine, _ = _engine(method, 1)
        wrapper.enable_cache(config=engine.cache_config)
        frames = _frames(wrapper, num_inference_steps=SP_STEPS, generator=torch.Generator().manual_seed(7))
        out[name] = {"latents": frames, "log": wrapper.manager.decision_log()}
    return out


@pytest.fixture(scope="module")
def single_process_runs():
    return _single_process()


def test_two_rank_parallel_equals_single_process(single_process_runs):
    run = run_on_ranks(_parallel_worker, 2, timeout_s=240)
    for config, parallel in PARALLEL.items():
        sp = "use_cfg_parallel" not in parallel
        for rank, results in enumerate(r[config] for r in run.results):
            # SP ranks hold half of the 48 video tokens and the matching RoPE rows; CFG ranks all of them
            assert results["local_rows"] == [(24, 24) if sp else (48, 48)], (config, results["local_rows"])
            assert results["usp"] == sp
            for name in METHODS:
                got, want = results[name], single_process_runs[name]
                assert got["log"] == want["log"], f"{config} rank {rank} {name}: decisions differ from single process"
                err = ((got["latents"] - want["latents"]).norm() / want["latents"].norm()).item()
                assert err <= 1e-5, f"{config} rank {rank} {name}: relative error {err:.2e}"
        hits = [a for n in ("Fb", "Tea", "Fast") for _, actions, _ in run.results[0][config][n]["log"] for a in actions if a != "C"]
        assert hits, f"{config}: no method cached anything, the equivalence check would be vacuous"
