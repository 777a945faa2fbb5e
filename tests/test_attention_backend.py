"""``--attention_backend``: which yunchang kernel USP runs, refused early when impossible, and
numerically the same attention as torch SDPA (one process and 2 gloo ranks, CPU only).

CUDA choices are checked with a ``torch.device("cuda")`` object and a patched flash-attn
detection flag: selection never touches the device, so no GPU is needed.
"""
from __future__ import annotations

import gc
import logging

import pytest
import torch
import torch.nn.functional as F
import yunchang.globals as yg
from yunchang.kernels import AttnType

from xfuser.config.config import ConfigError
from xfuser.core.attention import usp
from xfuser.core.attention.kernels import has_exact_lse, install_cpu_flash_kernel, select_attn_type
from xfuser.testing.multiprocess import free_port, run_on_ranks

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture(autouse=True)
def fresh_usp_state(monkeypatch):
    """Each test starts as a fresh process would: backend "auto", nothing logged or cached."""
    monkeypatch.setattr(usp, "_backend", "auto")
    monkeypatch.setattr(usp, "_announced", set())
    monkeypatch.setattr(usp, "_layers", {})


@pytest.fixture
def one_rank_groups():
    """A gloo world of one process with yunchang's Ulysses and Ring groups set (size 1 each)."""
    import torch.distributed as dist

    from yunchang.globals import PROCESS_GROUP

    assert not dist.is_initialized(), "another test left a process group behind"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    PROCESS_GROUP.ULYSSES_PG, PROCESS_GROUP.RING_PG = dist.new_group([0]), dist.new_group([0])
    yield
    PROCESS_GROUP.ULYSSES_PG = PROCESS_GROUP.RING_PG = None
    usp.reset_usp_layers()
    gc.collect()  # drop group handles before the world goes (gloo may abort at exit otherwise)
    dist.destroy_process_group()


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Reference in USP's (batch, tokens, heads, head_dim) layout."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale).transpose(1, 2)


# --- selection -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["auto", "sdpa", "cpu"])
@pytest.mark.parametrize("flash_installed", [False, True])
def test_every_cpu_backend_runs_the_cpu_flash_kernel(backend, flash_installed, monkeypatch):
    monkeypatch.setattr(yg, "HAS_FLASH_ATTN", flash_installed)  # flash-attn is never a CPU kernel
    assert select_attn_type(backend, CPU) is AttnType.TORCH_FLASH
    assert select_attn_type(backend, CPU, ring_degree=4) is AttnType.TORCH_FLASH


def test_flash_attn_on_cpu_is_a_config_error_naming_the_flag(monkeypatch):
    monkeypatch.setattr(yg, "HAS_FLASH_ATTN", True)
    with pytest.raises(ConfigError, match="--attention_backend flash_attn") as err:
        select_attn_type("flash_attn", CPU)
    assert "\n" not in str(err.value)


def test_flash_attn_without_the_package_says_how_to_fix_it(monkeypatch):
    monkeypatch.setattr(yg, "HAS_FLASH_ATTN", False)
    with pytest.raises(ConfigError, match="--attention_backend") as err:
        select_attn_type("flash_attn", CUDA)
    assert "pip install flash-attn" in str(err.value) and "--attention_backend sdpa" in str(err.value)


def test_flash_attn_on_cuda_with_the_package_is_flash_attn(monkeypatch):
    monkeypatch.setattr(yg, "HAS_FLASH_ATTN", True)
    assert select_attn_type("flash_attn", CUDA, ring_degree=2) is AttnType.FA


def test_cpu_backend_on_a_cuda_device_is_refused():
    with pytest.raises(ConfigError, match="--attention_backend cpu"):
        select_attn_type("cpu", CUDA)


@pytest.mark.parametrize("flash_installed,expected", [(True, AttnType.FA), (False, AttnType.TORCH_FLASH)])
def test_auto_on_cuda_prefers_flash_attn_when_installed(flash_installed, expected, monkeypatch):
    monkeypatch.setattr(yg, "HAS_FLASH_ATTN", flash_installed)
    assert select_attn_type("auto", CUDA) is expected


def test_sdpa_on_cuda_is_torch_flash_even_with_flash_attn_installed(monkeypatch):
    monkeypatch.setattr(yg, "HAS_FLASH_ATTN", True)
    assert select_attn_type("sdpa", CUDA) is AttnType.TORCH_FLASH


@pytest.mark.parametrize("backend,device", [("fastest", CPU), ("auto", torch.device("mps")), ("sdpa", torch.device("meta"))])
def test_unknown_backend_or_device_is_refused(backend, device):
    with pytest.raises(ConfigError, match="--attention_backend"):
        select_attn_type(backend, device)


def test_only_kernels_with_a_real_lse_are_offered_for_ring(monkeypatch):
    """Ring merges weight block outputs by their LSE: TORCH_MATH / TORCH_CUDNN return zeros."""
    assert not has_exact_lse(AttnType.TORCH_MATH) and not has_exact_lse(AttnType.TORCH_CUDNN)
    for flash_installed in (False, True):
        monkeypatch.setattr(yg, "HAS_FLASH_ATTN", flash_installed)
        for backend, device in [("auto", CPU), ("sdpa", CPU), ("cpu", CPU), ("auto", CUDA), ("sdpa", CUDA)]:
            assert has_exact_lse(select_attn_type(backend, device, ring_degree=2))


def test_the_cpu_flash_kernel_returns_the_true_lse_and_math_does_not():
    """What the table above claims, measured through yunchang's own forward on CPU."""
    from yunchang.kernels.attention import pytorch_attn_forward

    install_cpu_flash_kernel()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 6, 3, 8, generator=g) for _ in range(3))
    want = torch.logsumexp(torch.einsum("bqhd,bkhd->bhqk", q, k) * 8**-0.5, dim=-1)
    _, lse = pytorch_attn_forward(q, k, v, causal=False, op_type="flash")
    torch.testing.assert_close(lse, want, atol=1e-5, rtol=1e-5)
    _, fake = pytorch_attn_forward(q, k, v, causal=False, op_type="math")
    assert not fake.any()


# --- set_attention_backend --------------------------------------------------------------------


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append((record.levelno, record.getMessage()))


@pytest.fixture
def usp_log():
    handler = _Records()
    level = usp.logger.level
    usp.logger.addHandler(handler)
    usp.logger.setLevel(logging.INFO)
    yield handler.messages
    usp.logger.removeHandler(handler)
    usp.logger.setLevel(level)


def test_set_attention_backend_names_the_kernel_and_logs_it_once(usp_log):
    assert [usp.set_attention_backend("auto", "cpu") for _ in range(3)] == ["cpu-flash"] * 3
    assert usp_log == [(logging.INFO, "USP attention: cpu-flash (auto on cpu)")]


def test_set_attention_backend_on_pretend_cuda(monkeypatch, usp_log):
    monkeypatch.setattr(yg, "HAS_FLASH_ATTN", True)
    assert usp.set_attention_backend("auto", CUDA, ring_degree=2) == "flash-attn"
    assert usp.set_attention_backend("sdpa", CUDA) == "sdpa-flash"
    assert [m for _, m in usp_log] == ["USP attention: flash-attn (auto on cuda)", "USP attention: sdpa-flash (sdpa on cuda)"]


def test_a_refused_backend_leaves_the_previous_choice_in_place(monkeypatch):
    monkeypatch.setattr(yg, "HAS_FLASH_ATTN", False)
    usp.set_attention_backend("cpu", CPU)
    with pytest.raises(ConfigError):
        usp.set_attention_backend("flash_attn", CUDA)
    assert usp._backend == "cpu"


def test_changing_backend_drops_cached_layers_and_keeping_it_does_not():
    usp.set_attention_backend("sdpa", CPU)
    usp._layers["key"] = "layer bound to the sdpa kernel"
    usp.set_attention_backend("sdpa", CPU)
    assert usp._layers
    usp.set_attention_backend("cpu", CPU)
    assert not usp._layers


def test_usp_attention_refuses_the_cpu_backend_for_tensors_elsewhere(one_rank_groups):
    """The choice is re-checked against the tensors' device, not only the one given at setup."""
    usp.set_attention_backend("cpu", CPU)
    q = torch.empty(1, 4, 2, 8, device="meta")
    with pytest.raises(ConfigError, match="--attention_backend cpu needs CPU tensors"):
        usp.usp_attention(q, q, q)


# --- numerics ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", [None, "sdpa", "cpu"])  # None: set_attention_backend never called
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("scale", [None, 0.2])
def test_single_process_usp_equals_torch_sdpa(backend, dtype, tol, scale, one_rank_groups):
    if backend is not None:
        usp.set_attention_backend(backend, CPU)
    g = torch.Generator().manual_seed(1)
    # FastCache asks for fewer queries than keys/values: cover unequal token counts
    q = torch.randn(2, 7, 4, 16, generator=g).to(dtype)
    k, v = (torch.randn(2, 11, 4, 16, generator=g).to(dtype) for _ in range(2))
    out = usp.usp_attention(q, k, v, scale=scale)
    assert out.shape == q.shape
    torch.testing.assert_close(out.float(), _sdpa(q, k, v, scale).float(), atol=tol, rtol=tol)


def _sp_worker(rank: int, world: int, ulysses: int, ring: int) -> dict:
    from xfuser.core.attention.usp import set_attention_backend, usp_attention
    from xfuser.core.distributed import initialize_model_parallel

    initialize_model_parallel(ulysses_degree=ulysses, ring_degree=ring)
    name = set_attention_backend("sdpa", torch.device("cpu"), ring_degree=ring)
    q, k, v = _full_inputs()
    shard = lambda t: t.chunk(world, dim=1)[rank]  # noqa: E731 - contiguous token blocks per rank
    return {
        "kernel": name,
        **{str(dtype): usp_attention(*(shard(t).to(dtype) for t in (q, k, v))) for dtype in (torch.float32, torch.bfloat16)},
    }


def _full_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return tuple(torch.randn(1, 12, 4, 8, generator=g) for _ in range(3))


@pytest.mark.parametrize("ulysses,ring", [(2, 1), (1, 2)], ids=["ulysses2", "ring2"])
def test_two_rank_sdpa_equals_single_process(ulysses, ring):
    """Ring 2 merges two blocks by their LSE, so it fails if the kernel's LSE is not real."""
    run = run_on_ranks(_sp_worker, 2, ulysses, ring, timeout_s=60, collective_timeout_s=30)
    q, k, v = _full_inputs()
    assert {r["kernel"] for r in run.results} == {"cpu-flash"}
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        got = torch.cat([r[str(dtype)] for r in run.results], dim=1).float()
        want = _sdpa(q.to(dtype), k.to(dtype), v.to(dtype)).float()
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
