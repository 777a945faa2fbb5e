"""Run code on N gloo ranks from a test, with a deadline, and get each rank's result back.

Why not ``torch.multiprocessing.spawn``: tests need (a) a hard wall-clock timeout that kills
stuck ranks instead of hanging CI, (b) each rank's return value, and (c) each rank's exit code
(a gloo process can compute the right answer and still abort at exit; teardown tests look for
that). Results travel through files, not shared-memory queues, so they outlive the children.
"""
from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection  # noqa: F401  (mp.connection.wait)
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


def free_port() -> int:
    """An unused TCP port on 127.0.0.1 (the OS picks; tiny race window accepted)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RankFailed(RuntimeError):
    """At least one rank raised, timed out or exited non-zero."""


@dataclass
class RankRun:
    results: list[Any]
    exitcodes: list[int]
    wall_s: float
    #: per rank: seconds from the start until its process ended (None: still running at the deadline, killed)
    exit_s: list[float | None] = field(default_factory=list)
    #: per rank: the traceback of what it raised ("" when it returned)
    errors: list[str] = field(default_factory=list)
    #: ranks still running at the deadline (killed), process ids, and the rendezvous port
    stuck: list[int] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)
    port: int = 0
    #: ``time.time()`` at the start, to compare ``exit_s`` with times the ranks record themselves
    started_at: float = 0.0


def _child(fn, rank, world_size, port, out_dir, args, kwargs, collective_timeout_s, env, startup_timeout_s=None) -> None:
    os.environ.update(env)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        XFUSER_DIST_BACKEND="gloo",
    )
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from xfuser.core.distributed import destroy_distributed_environment, init_distributed_environment

    out = Path(out_dir) / f"rank{rank}.pt"
    try:
        init_distributed_environment(backend="gloo", timeout_s=collective_timeout_s, startup_timeout_s=startup_timeout_s)
        result = fn(rank, world_size, *args, **kwargs)
        torch.save({"ok": True, "result": result}, out)
    except BaseException:  # noqa: BLE001 - reported to the parent, then re-raised
        torch.save({"ok": False, "error": traceback.format_exc()}, out)
        raise
    finally:
        destroy_distributed_environment()


def _context():
    """A forkserver that has imported torch once: each rank then starts in milliseconds
    instead of re-importing torch (seconds on 2 cores), and still gets a fresh, thread-free
    process (unlike plain fork from a pytest process that may hold OpenMP threads)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "xfuser.core.distributed"])
    return ctx


def run_on_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = 120.0,
    collective_timeout_s: float = 60.0,
    env: dict[str, str] | None = None,
    check_exitcodes: bool = True,
    startup_timeout_s: float | None = None,
    allow_failures: bool = False,
    **kwargs: Any,
) -> RankRun:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` gloo ranks.

    ``fn`` must be importable by name (a module-level function). The process group is
    initialised before ``fn`` runs and torn down after. Raises :class:`RankFailed` with the
    failing rank's traceback, or when the whole run exceeds ``timeout_s``.
    ``startup_timeout_s`` is passed to ``init_distributed_environment`` (None: its default).
    With ``allow_failures`` nothing is raised: fault tests read each rank's outcome from the
    returned run (``results[r]`` is None for a rank that raised, died or was killed; see
    ``errors``, ``exitcodes``, ``exit_s`` and ``stuck``).
    """
    ctx = _context()
    port = free_port()
    child_env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    child_env.update(env or {})
    with tempfile.TemporaryDirectory(prefix="xfuser-ranks-") as out_dir:
        procs = [
            ctx.Process(
                target=_child,
                args=(fn, rank, world_size, port, out_dir, args, kwargs, collective_timeout_s, child_env,
                      startup_timeout_s),
                daemon=False,
            )
            for rank in range(world_size)
        ]
        started_at = time.time()
        start = time.monotonic()
        for p in procs:
            p.start()
        deadline = start + timeout_s
        exit_s: list[float | None] = [None] * world_size
        pending = {p.sentinel: r for r, p in enumerate(procs)}
        while pending:  # wake as each rank ends, to record when it did
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for sentinel in mp.connection.wait(list(pending), timeout=left):
                exit_s[pending.pop(sentinel)] = time.monotonic() - start
        for p in procs:
            p.join(max(0.0, min(1.0, deadline - time.monotonic())))
        wall = time.monotonic() - start
        stuck = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        records = {}
        for rank in range(world_size):
            path = Path(out_dir) / f"rank{rank}.pt"
            records[rank] = torch.load(path, weights_only=False) if path.exists() else None
        exitcodes = [p.exitcode for p in procs]
        if allow_failures:
            return RankRun(
                [rec["result"] if rec and rec["ok"] else None for rec in records.values()], exitcodes, wall,
                exit_s=exit_s, errors=[rec["error"] if rec and not rec["ok"] else "" for rec in records.values()],
                stuck=stuck, pids=[p.pid for p in procs], port=port, started_at=started_at,
            )
        errors = [f"rank {r}:\n{rec['error']}" for r, rec in records.items() if rec and not rec["ok"]]
        if errors:
            raise RankFailed("\n".join(errors))
        if stuck:
            raise RankFailed(f"ranks {stuck} still running after {timeout_s:.0f}s; killed")
        missing = [r for r, rec in records.items() if rec is None]
        if missing:
            raise RankFailed(f"ranks {missing} produced no result (exit codes {exitcodes})")
        if check_exitcodes and any(code != 0 for code in exitcodes):
            raise RankFailed(f"ranks returned correct results but exited with codes {exitcodes}")
        return RankRun([records[r]["result"] for r in range(world_size)], exitcodes, wall, exit_s=exit_s,
                       errors=[""] * world_size, stuck=stuck, pids=[p.pid for p in procs], port=port,
                       started_at=started_at)


def run_torchrun(
    script_and_args: Sequence[str],
    nproc_per_node: int,
    timeout_s: float = 300.0,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    master_port: int | None = None,
) -> subprocess.CompletedProcess:
    """Run ``torchrun --nproc_per_node=N script args...`` on 127.0.0.1 with a deadline.

    Uses ``python -m torch.distributed.run`` so the current interpreter is used; raises
    ``subprocess.TimeoutExpired`` on timeout and returns the completed process otherwise
    (the caller asserts on ``returncode``/output). ``master_port``: the rendezvous port (default:
    a free one), for tests that check nothing listens on it afterwards.
    """
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc_per_node}",
        "--master_addr=127.0.0.1",
        f"--master_port={master_port or free_port()}",
        *script_and_args,
    ]
    full_env = dict(os.environ)
    full_env.update({"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "XFUSER_DIST_BACKEND": "gloo"})
    full_env.update(env or {})
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=full_env, cwd=cwd)
