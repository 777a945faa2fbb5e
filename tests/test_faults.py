"""Faults end cleanly: a rank killed, stalled or raising never holds the job.

Every survivor must leave within the collective timeout + 10 s with a ``CollectiveTimeout``
saying what happened (``PeerLost`` when the peer's process is gone, a timeout when it is alive
but silent), naming the group, the operation and the peers; afterwards no rank process is left
and nothing listens on the rendezvous port. Covered under manual launch (``run_on_ranks``, USP
through yunchang's all-to-all and ring P2P) and under torchrun (the example entry on a tiny
PixArt-Σ). The 20-repeat version of each is marked ``slow``.
"""
from __future__ import annotations

import os
import pickle
import signal
import textwrap
import time
from pathlib import Path

import pytest
import torch

from xfuser.core.distributed import CollectiveTimeout, PeerLost, collective_error
from xfuser.testing.multiprocess import free_port, run_on_ranks, run_torchrun

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 4.0  # the short --collective_timeout of these tests
GRACE_S = 10.0  # what a survivor may take beyond it


# ---------------------------------------------------------------------------------- helpers
def _listening(port: int) -> bool:
    """Whether a socket listens on ``port`` (any address, IPv4 or IPv6)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for row in rows:
            fields = row.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # 0A: LISTEN
                return True
    return False


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _processes_with(marker: str) -> list[int]:
    """Live processes whose command line contains ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline and _alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def _inject(kind: str, timeout_s: float, fault_file: str) -> None:
    """Record when the fault happens, then do it."""
    Path(fault_file).write_text(repr(time.time()))
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "raise":
        raise RuntimeError("injected fault: this rank raised")
    elif kind == "stall":
        time.sleep(timeout_s + 1.5)  # past the timeout, then carry on: its peers are gone by now
    else:
        raise ValueError(kind)


def _outcome(exc: CollectiveTimeout) -> dict:
    return {"type": type(exc).__name__, "reason": exc.reason, "group": exc.group, "op": exc.op,
            "peers": exc.peers, "elapsed_s": exc.elapsed_s, "message": str(exc), "at": time.time()}


# ---------------------------------------------------------------------------------- unit
class _FakeWork:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def wait(self, timeout=None):
        raise self.exc


def test_messages_tell_a_lost_peer_from_a_timeout():
    from xfuser.core.distributed import GroupCoordinator

    g = GroupCoordinator("pp", [0, 1, 2], None, 1, timeout_s=5.0)
    reset = RuntimeError("[/x/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:4242: Connection reset by peer. "
                         "This is typically caused by a remote worker hanging")
    with pytest.raises(PeerLost) as info:
        g.wait(_FakeWork(reset), "recv")
    exc = info.value
    assert exc.reason == "peer_lost" and exc.group == "pp" and exc.op == "recv" and exc.peers == [0, 2]
    assert exc.elapsed_s < 1.0 and exc.timeout_s == 5.0
    text = str(exc)
    assert text.startswith("peer lost: recv on group 'pp'") and "peer rank(s) [0, 2]" in text
    assert "Connection reset by peer" in text and "pair.cc" not in text and "within 5s" not in text

    timed_out = RuntimeError("[/x/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 5000ms for recv operation")
    with pytest.raises(CollectiveTimeout) as info:
        g.wait(_FakeWork(timed_out), "recv")
    assert type(info.value) is CollectiveTimeout and info.value.reason == "timeout"
    assert str(info.value).startswith("collective timeout: recv on group 'pp'")

    # the peer of a P2P handle is the one named
    handle = type("H", (), {"peer": 2, "wait": _FakeWork(reset).wait})()
    with pytest.raises(PeerLost) as info:
        g.wait(handle, "PipeFusion recv")
    assert info.value.peers == [2]

    # an unrecognised backend error is neither: classified by the time it took
    odd = RuntimeError("gloo: something else")
    assert collective_error(odd, group="g", op="o", ranks=[0, 1], peers=[1], global_rank=0, elapsed_s=0.1,
                            timeout_s=5).reason == "error"
    assert collective_error(odd, group="g", op="o", ranks=[0, 1], peers=[1], global_rank=0, elapsed_s=4.9,
                            timeout_s=5).reason == "timeout"
    # an error that is no communication failure is left alone
    assert collective_error(ValueError("shape mismatch"), group="g", op="o", ranks=[0, 1], peers=[1],
                            global_rank=0, elapsed_s=0.1, timeout_s=5) is None
    # the fields survive pickling (results travel between processes)
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is PeerLost and back.peers == [0, 2] and str(back) == str(exc)


def test_default_timeouts():
    from xfuser.config.args import xFuserArgs
    from xfuser.config.config import RuntimeConfig
    from xfuser.core.distributed import DEFAULT_COLLECTIVE_TIMEOUT_S, DEFAULT_STARTUP_TIMEOUT_S
    from xfuser.core.distributed.parallel_state import startup_timeout_for

    assert RuntimeConfig().collective_timeout_s == DEFAULT_COLLECTIVE_TIMEOUT_S == 120.0
    assert xFuserArgs().collective_timeout == 120.0
    assert DEFAULT_STARTUP_TIMEOUT_S == 600.0
    assert startup_timeout_for(5.0) == 600.0 and startup_timeout_for(5.0, 2.0) == 5.0  # never below the timeout
    assert startup_timeout_for(900.0) == 900.0


# ---------------------------------------------------------------------------------- manual launch
def _usp_worker(rank: int, world: int, kind: str, faulty: int, ulysses: int, ring: int, fault_file: str):
    from xfuser.core.attention.usp import usp_attention
    from xfuser.core.distributed import initialize_model_parallel

    initialize_model_parallel(ulysses_degree=ulysses, ring_degree=ring)
    gen = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(1, 8, 4, 8, generator=gen) for _ in range(3))
    for step in range(200):
        if rank == faulty and step == 3:
            _inject(kind, TIMEOUT_S, fault_file)
        try:
            q = usp_attention(q, k, v).detach()
        except CollectiveTimeout as exc:
            return _outcome(exc)
    return {"type": None}


def _run_manual(kind: str, tmp_path: Path, ulysses: int = 2, ring: int = 1, faulty: int = 1):
    world = ulysses * ring
    fault_file = str(tmp_path / f"fault-{kind}-{time.monotonic_ns()}")
    run = run_on_ranks(_usp_worker, world, kind, faulty, ulysses, ring, fault_file, timeout_s=90,
                       collective_timeout_s=TIMEOUT_S, startup_timeout_s=60, allow_failures=True)
    fault_at = float(Path(fault_file).read_text())
    survivors = [r for r in range(world) if r != faulty]
    group = "ulysses" if ring == 1 else "ring"
    for r in survivors:
        out = run.results[r]
        assert out is not None, f"rank {r} did not return: {run.errors[r]} (exit code {run.exitcodes[r]})"
        assert out["group"] == group and out["peers"] and faulty in out["peers"], out
        assert (out["op"].startswith("all_to_all") if group == "ulysses" else out["op"].startswith("ring p2p")), out
        left_after = run.started_at + run.exit_s[r] - fault_at
        assert left_after <= TIMEOUT_S + GRACE_S, f"rank {r} left {left_after:.1f}s after the fault"
        assert run.exitcodes[r] == 0
    # the faulty rank itself
    if kind == "kill":
        assert run.exitcodes[faulty] == -signal.SIGKILL
    elif kind == "raise":
        assert "injected fault" in run.errors[faulty] and run.exitcodes[faulty] == 1
    else:  # it woke after the others had given up: their connections are closed
        assert run.results[faulty]["type"] == "PeerLost", run.results[faulty]
    assert not run.stuck
    assert not [pid for pid in run.pids if _alive(pid)], "a rank process is left"
    assert not _listening(run.port), f"something still listens on the rendezvous port {run.port}"
    return run, [run.results[r] for r in survivors], fault_at


@pytest.mark.parametrize("kind", ["kill", "stall", "raise"])
def test_usp_fault_under_manual_launch(kind, tmp_path):
    run, (out,), fault_at = _run_manual(kind, tmp_path)
    if kind == "stall":  # alive but silent: a real timeout, after about the timeout
        assert out["type"] == "CollectiveTimeout" and out["reason"] == "timeout", out
        assert TIMEOUT_S - 0.5 <= out["elapsed_s"] <= TIMEOUT_S + 3.0, out
        assert out["message"].startswith("collective timeout: all_to_all")
    else:  # its process is gone: said so at once, not after the timeout
        assert out["type"] == "PeerLost" and out["reason"] == "peer_lost", out
        assert out["elapsed_s"] < TIMEOUT_S / 2, out
        assert out["message"].startswith("peer lost: all_to_all (yunchang Ulysses) on group 'ulysses'"), out
    assert "peer rank(s) [1]" in out["message"]


def test_ring_p2p_stall_names_the_ring(tmp_path):
    _, (out,), _ = _run_manual("stall", tmp_path, ulysses=1, ring=2)
    assert out["type"] == "CollectiveTimeout" and out["reason"] == "timeout", out
    assert out["message"].startswith("collective timeout: ring p2p"), out


def _slow_phase(rank: int, world: int) -> dict:
    from xfuser.core.distributed import extended_collective_timeout, get_world_group, initialize_model_parallel

    initialize_model_parallel(ulysses_degree=world)
    world_group = get_world_group()
    with extended_collective_timeout(30.0):
        inside = world_group.timeout.total_seconds()
        if rank == 1:
            time.sleep(2.5)  # past the 1 s timeout, within the extended one
        world_group.all_reduce(torch.ones(1))
    after = world_group.timeout.total_seconds()
    if rank == 1:
        time.sleep(2.5)
    try:
        world_group.all_reduce(torch.ones(1))
        raised = None
    except CollectiveTimeout as exc:
        raised = exc.reason
    return {"inside": inside, "after": after, "raised": raised}


def test_extended_timeout_covers_a_slow_phase_then_restores():
    run = run_on_ranks(_slow_phase, 2, timeout_s=60, collective_timeout_s=1.0, startup_timeout_s=60,
                       allow_failures=True)
    out = run.results[0]
    assert out == {"inside": 30.0, "after": 1.0, "raised": "timeout"}, (out, run.errors)


# ---------------------------------------------------------------------------------- torchrun
_SCRIPT = '''
"""The PixArt-Sigma example entry with a fault injected on one rank (tests/test_faults.py)."""
import os, signal, sys, time
from pathlib import Path

from diffusers import PixArtSigmaPipeline

from xfuser.cli import run_example

KIND, FAULTY, AT, TIMEOUT, FAULT_FILE = sys.argv[1:6]


def inject(ns, pipe):
    calls = [0]

    def hook(module, args, kwargs):
        calls[0] += 1
        if int(os.environ["RANK"]) == int(FAULTY) and calls[0] == int(AT):
            Path(FAULT_FILE).write_text(repr(time.time()))
            if KIND == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if KIND == "raise":
                raise RuntimeError("injected fault: this rank raised")
            time.sleep(float(TIMEOUT) + 1.5)

    pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    return {}


run_example(PixArtSigmaPipeline, "pixart-sigma", argv=sys.argv[6:], call_inputs=inject)
'''


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from xfuser.testing.tiny_pipelines import save_tiny_pipeline

    return save_tiny_pipeline("pixart-sigma", tmp_path_factory.mktemp("faults") / "model")


def _run_torchrun(kind: str, tmp_path: Path, model: Path):
    script = tmp_path / f"faulty_example_{kind}_{time.monotonic_ns()}.py"
    script.write_text(textwrap.dedent(_SCRIPT))
    fault_file = tmp_path / f"fault-{kind}"
    port = free_port()
    start = time.time()
    proc = run_torchrun(
        [str(script), kind, "1", "3", str(TIMEOUT_S), str(fault_file),
         "--model", str(model), "--ulysses_degree", "2", "--num_inference_steps", "8", "--height", "32",
         "--width", "32", "--max_sequence_length", "16", "--output_dir", str(tmp_path / "out"),
         "--cache_method", "None", "--collective_timeout", str(TIMEOUT_S)],
        nproc_per_node=2, timeout_s=240, cwd=ROOT, master_port=port,
        env={"XFUSER_PROGRESS": "0", "XFUSER_STARTUP_TIMEOUT": "120"},
    )
    ended = time.time()
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    fault_at = float(fault_file.read_text())
    assert ended - fault_at <= TIMEOUT_S + GRACE_S, f"the job ended {ended - fault_at:.1f}s after the fault"
    assert not _processes_with(script.name), "a rank process is left"
    assert not _listening(port), f"something still listens on the rendezvous port {port}"
    return out, ended - start


# the default suite runs the stall (the timeout path through the whole runner); kill and raise,
# whose survivor path the manual-launch tests already cover, cost 15 s each here: slow
@pytest.mark.parametrize("kind", [pytest.param("kill", marks=pytest.mark.slow), "stall",
                                  pytest.param("raise", marks=pytest.mark.slow)])
def test_example_fault_under_torchrun(kind, tmp_path, tiny_model):
    out, _ = _run_torchrun(kind, tmp_path, tiny_model)
    survivor = [line for line in out.splitlines() if "[rank0 " in line and "ERROR" in line]
    assert survivor, out[-3000:]
    line = survivor[0]
    if kind == "stall":
        assert "collective timeout: " in line and f"timeout {TIMEOUT_S:g}s" in line, line
    else:
        assert "peer lost: " in line, line
    assert "on group '" in line and "peer rank(s) [1]" in line, line
    if kind == "raise":
        assert "injected fault: this rank raised" in out


# ---------------------------------------------------------------------------------- 20/20
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["kill", "stall", "raise"])
def test_usp_fault_20_of_20_under_manual_launch(kind, tmp_path):
    for i in range(20):
        (tmp_path / str(i)).mkdir()
        _run_manual(kind, tmp_path / str(i))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["kill", "stall", "raise"])
def test_example_fault_20_of_20_under_torchrun(kind, tmp_path, tiny_model):
    for i in range(20):
        (tmp_path / str(i)).mkdir()
        _run_torchrun(kind, tmp_path / str(i), tiny_model)
