"""Configuration: CLI parsing and every validation error, before anything loads."""
from __future__ import annotations

import argparse
import math

import pytest

from xfuser.config import DEFAULT_MODEL, CacheConfig, ConfigError, InputConfig, ParallelConfig, xFuserArgs


def parse(argv: list[str]) -> xFuserArgs:
    parser = xFuserArgs.add_cli_args(argparse.ArgumentParser())
    return xFuserArgs.from_cli_args(parser.parse_args(argv))


BAD = [
    # (args, world size, flag the message must name)
    (dict(ulysses_degree=2), 1, "--ulysses_degree"),
    (dict(ulysses_degree=2, use_cfg_parallel=True, guidance_scale=4.5), 2, "world size is 2"),
    (dict(data_parallel_degree=0), 1, "--data_parallel_degree"),
    (dict(ring_degree=-1), 1, "--ring_degree"),
    (dict(cache_ratio_threshold=-0.1), 1, "--cache_ratio_threshold"),
    (dict(cache_ratio_threshold=math.nan), 1, "--cache_ratio_threshold"),
    (dict(motion_threshold=math.inf), 1, "--motion_threshold"),
    (dict(significance_level=0.0), 1, "--significance_level"),
    (dict(significance_level=1.5), 1, "--significance_level"),
    (dict(cache_method="Foo"), 1, "--cache_method"),
    (dict(num_inference_steps=0), 1, "--num_inference_steps"),
    (dict(pipefusion_parallel_degree=2, num_pipeline_patch=1), 2, "--num_pipeline_patch"),
    (dict(pipefusion_parallel_degree=2, attn_layer_num_for_pp=[4]), 2, "--attn_layer_num_for_pp"),
    (dict(height=-64), 1, "--height"),
    (dict(use_cfg_parallel=True, guidance_scale=1.0), 2, "--guidance_scale"),
    (dict(pipefusion_parallel_degree=2, warmup_steps=30, num_inference_steps=20), 2, "--warmup_steps"),
    (dict(cache_warmup_steps=-1), 1, "--cache_warmup_steps"),
    (dict(cache_warmup_steps=20, num_inference_steps=20), 1, "--cache_warmup_steps"),
    (dict(max_cached_steps=-5), 1, "--max_cached_steps"),
    (dict(pipefusion_parallel_degree=2, height=100, num_pipeline_patch=3), 2, "--height"),
    (dict(data_parallel_degree=2, prompt=["a", "b", "c"]), 2, "--data_parallel_degree"),
    (dict(dtype="float8"), 1, "--dtype"),
    (dict(tea_coefficients="/nonexistent/coeffs.json"), 1, "--tea_coefficients"),
    (dict(collective_timeout=0.0), 1, "--collective_timeout"),
    (dict(pipefusion_parallel_degree=2, attn_layer_num_for_pp=[4, 0]), 2, "--attn_layer_num_for_pp"),
    (dict(width=0), 1, "--width"),
    (dict(guidance_scale=math.nan), 1, "--guidance_scale"),
    (dict(prompt=[]), 1, "--prompt"),
]


@pytest.mark.parametrize("kwargs,world,flag", BAD, ids=[str(b[0]) for b in BAD])
def test_bad_input_raises_naming_the_flag(kwargs, world, flag):
    with pytest.raises(ConfigError) as info:
        xFuserArgs(**kwargs).create_config(world_size=world)
    assert flag in str(info.value)


def test_dash_and_underscore_spellings_are_the_same_flag():
    a = parse(["--ulysses_degree", "2", "--cache_ratio_threshold", "0.1", "--use_cfg_parallel", "--num_inference_steps", "7"])
    b = parse(["--ulysses-degree", "2", "--cache-ratio-threshold", "0.1", "--use-cfg-parallel", "--num-inference-steps", "7"])
    assert a == b
    assert a.ulysses_degree == 2 and a.use_cfg_parallel and a.num_inference_steps == 7


def test_create_config_round_trip():
    args = parse([
        "--model", "some/dir", "--prompt", "p1", "p2", "--data_parallel_degree", "2", "--ulysses_degree", "2",
        "--use_cfg_parallel", "--guidance_scale", "3", "--cache_method", "Tea", "--cache_ratio_threshold", "0.2",
        "--max_cached_steps", "3", "--height", "256", "--width", "256",
    ])
    engine, inputs = args.create_config(world_size=8)
    p, c = engine.parallel_config, engine.cache_config
    assert (p.dp_degree, p.cfg_degree, p.ulysses_degree, p.ring_degree, p.pp_degree) == (2, 2, 2, 1, 1)
    assert p.world_size == 8 and p.sp_degree == 2
    assert c.method == "Tea" and c.cache_ratio_threshold == 0.2 and c.max_cached_steps == 3 and c.enabled
    assert inputs.prompt == ["p1", "p2"] and inputs.batch_size == 2 and inputs.height == 256
    assert engine.model_config.model == "some/dir"


def test_defaults_are_the_embedded_model_and_fastcache():
    engine, inputs = parse([]).create_config(world_size=1)
    assert engine.model_config.model.endswith("assets/models/xfuser-shapes-pixart")
    assert engine.cache_config.method == "Fast" and engine.cache_config.cache_ratio_threshold == 0.05
    assert engine.parallel_config.world_size == 1 and inputs.num_inference_steps == 20


@pytest.mark.parametrize("given,expected", [("fast", "Fast"), ("FB", "Fb"), ("tea", "Tea"), (None, "None"), ("none", "None")])
def test_method_names_normalised(given, expected):
    assert CacheConfig(method=given).method == expected


def test_unknown_method_via_cli_is_rejected_by_argparse():
    with pytest.raises(SystemExit):
        parse(["--cache_method", "Foo"])


@pytest.mark.parametrize("kwargs,flag", [
    (dict(cfg_degree=3), "--use_cfg_parallel"),
    (dict(cfg_degree=0), "--use_cfg_parallel"),
    (dict(pp_degree=3, num_pipeline_patch=2), "--num_pipeline_patch"),
])
def test_bad_parallel_config_direct(kwargs, flag):
    with pytest.raises(ConfigError, match=flag):
        ParallelConfig(**kwargs)


def test_world_size_message_names_every_degree_and_the_fix():
    with pytest.raises(ConfigError) as info:
        xFuserArgs(ulysses_degree=2, use_cfg_parallel=True, guidance_scale=4.5).create_config(world_size=2)
    msg = str(info.value)
    for part in ("--data_parallel_degree(1)", "--use_cfg_parallel", "--ulysses_degree(2)", "--ring_degree(1)",
                 "--pipefusion_parallel_degree(1)", "= 4", "world size is 2", "--nproc_per_node"):
        assert part in msg


@pytest.mark.parametrize("world", [0, -1, "2"])
def test_bad_explicit_world_size(world):
    with pytest.raises(ConfigError, match="world size"):
        xFuserArgs().create_config(world_size=world)


def test_world_size_defaults_to_env(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    engine, _ = xFuserArgs(data_parallel_degree=2, prompt=["a", "b"]).create_config()
    assert engine.parallel_config.world_size == 2
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="WORLD_SIZE"):
        xFuserArgs().create_config()


def test_every_flag_has_both_spellings():
    parser = xFuserArgs.add_cli_args(argparse.ArgumentParser())
    opts = {o for a in parser._actions for o in a.option_strings}
    for o in opts:
        if o.startswith("--") and o != "--help":
            assert o.replace("_", "-") in opts and o.replace("-", "_").replace("__", "--", 1) in opts, o


def test_cache_config_defaults_and_no_cap():
    c = CacheConfig()
    assert c.method == "None" and not c.enabled and c.max_cached_steps == -1
    assert c.betas == (0.01, 0.5, -0.002, 0.00005) and c.cache_warmup_steps == 1
    assert CacheConfig(method="Fb", max_cached_steps=0).max_cached_steps == 0


def test_cache_warmup_beyond_the_steps_is_refused_only_when_a_method_runs():
    """Warm-up steps only mean something to a cache method: a value no schedule can honour is an
    error with caching on, and irrelevant (not an error) with caching off."""
    engine, _ = xFuserArgs(cache_method="None", cache_warmup_steps=50, num_inference_steps=4).create_config(world_size=1)
    assert engine.cache_config.cache_warmup_steps == 50 and not engine.cache_config.enabled
    with pytest.raises(ConfigError, match="--cache_warmup_steps"):
        xFuserArgs(cache_method="Fast", cache_warmup_steps=50, num_inference_steps=4).create_config(world_size=1)


def test_pipefusion_defaults_patches_to_degree():
    engine, _ = xFuserArgs(pipefusion_parallel_degree=2, height=64).create_config(world_size=2)
    assert engine.parallel_config.num_pipeline_patch == 2


def test_input_config_batch_and_negative_prompts():
    assert InputConfig(prompt="one").batch_size == 1
    assert InputConfig(prompt=["a", "b"], negative_prompt=["n1", "n2"]).batch_size == 2
    with pytest.raises(ConfigError, match="--negative_prompt"):
        InputConfig(prompt=["a", "b", "c"], negative_prompt=["n1", "n2"])


def test_defaults_have_one_source_the_config_dataclasses():
    """The CLI's defaults are xFuserArgs' and xFuserArgs' are the configs': parsing no flag,
    building xFuserArgs() and the config dataclasses' own defaults give the same engine, except
    the cache method (the product runs Fast; a bare CacheConfig() caches nothing)."""
    import dataclasses

    from xfuser.config.config import ParallelConfig, RuntimeConfig

    assert parse([]) == xFuserArgs()
    engine, inputs = xFuserArgs().create_config(world_size=1)
    assert engine.model_config.model == DEFAULT_MODEL
    assert inputs == InputConfig()
    assert engine.parallel_config == ParallelConfig() and engine.runtime_config == RuntimeConfig()
    assert engine.cache_config.method == "Fast"
    assert dataclasses.replace(engine.cache_config, method="None") == CacheConfig()
    # a changed config default reaches the CLI: the parser reads it from the dataclass
    help_text = xFuserArgs.add_cli_args(argparse.ArgumentParser()).format_help()
    assert f"(default: {CacheConfig().cache_ratio_threshold})" in " ".join(help_text.split())
