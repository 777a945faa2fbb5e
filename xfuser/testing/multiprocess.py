"""Run code on N gloo ranks from a test, with a deadline, and get each rank's result back.

Why not ``torch.multiprocessing.spawn``: tests need (a) a hard wall-clock timeout that kills
stuck ranks instead of hanging CI, (b) each rank's return value, and (c) each rank's exit code
(a gloo process can compute the right answer and still abort at exit; teardown tests look for
that). Results travel through files, not shared-memory queues, so they outlive the children.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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


def _child(fn, rank, world_size, port, out_dir, args, kwargs, collective_timeout_s, env) -> None:
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
        init_distributed_environment(backend="gloo", timeout_s=collective_timeout_s)
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
    **kwargs: Any,
) -> RankRun:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` gloo ranks.

    ``fn`` must be importable by name (a module-level function). The process group is
    initialised before ``fn`` runs and torn down after. Raises :class:`RankFailed` with the
    failing rank's traceback, or when the whole run exceeds ``timeout_s``.
    """
    ctx = _context()
    port = free_port()
    child_env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    child_env.update(env or {})
    with tempfile.TemporaryDirectory(prefix="xfuser-ranks-") as out_dir:
        procs = [
            ctx.Process(
                target=_child,
                args=(fn, rank, world_size, port, out_dir, args, kwargs, collective_timeout_s, child_env),
                daemon=False,
            )
            for rank in range(world_size)
        ]
        start = time.monotonic()
        for p in procs:
            p.start()
        deadline = start + timeout_s
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
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
        errors = [f"rank {r}:\n{rec['error']}" for r, rec in records.items() if rec and not rec["ok"]]
        if errors:
            raise RankFailed("\n".join(errors))
        if stuck:
            raise RankFailed(f"ranks {stuck} still running after {timeout_s:.0f}s; killed")
        exitcodes = [p.exitcode for p in procs]
        missing = [r for r, rec in records.items() if rec is None]
        if missing:
            raise RankFailed(f"ranks {missing} produced no result (exit codes {exitcodes})")
        if check_exitcodes and any(code != 0 for code in exitcodes):
            raise RankFailed(f"ranks returned correct results but exited with codes {exitcodes}")
        return RankRun([records[r]["result"] for r in range(world_size)], exitcodes, wall)


def run_torchrun(
    script_and_args: Sequence[str],
    nproc_per_node: int,
    timeout_s: float = 300.0,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
) -> subprocess.CompletedProcess:
    """Run ``torchrun --nproc_per_node=N script args...`` on 127.0.0.1 with a deadline.

    Uses ``python -m torch.distributed.run`` so the current interpreter is used; raises
    ``subprocess.TimeoutExpired`` on timeout and returns the completed process otherwise
    (the caller asserts on ``returncode``/output).
    """
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc_per_node}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        *script_and_args,
    ]
    full_env = dict(os.environ)
    full_env.update({"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "XFUSER_DIST_BACKEND": "gloo"})
    full_env.update(env or {})
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=full_env, cwd=cwd)
