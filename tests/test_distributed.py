"""Distributed core: documented rank layout, every collective on gloo, timeouts, teardown."""
from __future__ import annotations

import time

import pytest
import torch

from xfuser.core.distributed import GROUP_KINDS, RankLayout
from xfuser.testing.multiprocess import run_on_ranks

# ----------------------------------------------------------------------------- pure layout


@pytest.mark.parametrize(
    "layout",
    [
        RankLayout(dp=2, cfg=2),
        RankLayout(ulysses=2, ring=2),
        RankLayout(cfg=2, ulysses=2),
        RankLayout(pp=2, ulysses=2),
        RankLayout(dp=2, cfg=2, ulysses=2),
        RankLayout(cfg=2, pp=2, ring=2),
        RankLayout(dp=2, ulysses=2, ring=2),
        RankLayout(pp=4, ulysses=2),
        RankLayout(ulysses=8),
    ],
    ids=repr,
)
def test_every_group_kind_partitions_the_world_consistently(layout: RankLayout) -> None:
    for kind in GROUP_KINDS:
        groups = layout.groups(kind)
        flat = sorted(r for g in groups for r in g)
        assert flat == list(range(layout.world_size)), kind
        for group in groups:
            # members differ only along the dimensions the kind varies over
            coords = [layout.coords(r) for r in group]
            fixed = {"dp", "cfg", "pp", "ring", "ulysses"} - {
                "dp": {"dp"}, "cfg": {"cfg"}, "pp": {"pp"}, "sp": {"ring", "ulysses"},
                "ulysses": {"ulysses"}, "ring": {"ring"}, "cfg_sp": {"cfg", "ring", "ulysses"},
            }[kind]
            for dim in fixed:
                assert len({c[dim] for c in coords}) == 1, (kind, dim, group)
    for rank in range(layout.world_size):
        c = layout.coords(rank)
        assert layout.rank_of(c["dp"], c["cfg"], c["pp"], c["ring"], c["ulysses"]) == rank


def test_documented_order_sp_fastest_then_pp_cfg_dp() -> None:
    layout = RankLayout(dp=2, cfg=2, ulysses=2)  # 8 ranks
    assert layout.groups("sp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout.groups("cfg") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert layout.groups("dp") == [[0, 4], [1, 5], [2, 6], [3, 7]]

    layout = RankLayout(cfg=2, pp=2, ulysses=2)  # 8 ranks: sp, then pp, then cfg
    assert layout.groups("sp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout.groups("pp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert layout.groups("cfg") == [[0, 4], [1, 5], [2, 6], [3, 7]]

    layout = RankLayout(ulysses=2, ring=2)  # 4 ranks: ulysses low inside SP
    assert layout.groups("ulysses") == [[0, 1], [2, 3]]
    assert layout.groups("ring") == [[0, 2], [1, 3]]
    assert layout.groups("sp") == [[0, 1, 2, 3]]


def test_bad_degrees_rejected() -> None:
    with pytest.raises(ValueError, match="must be >= 1"):
        RankLayout(ulysses=0)


# ----------------------------------------------------------------------------- multi-rank


def _collectives(rank: int, world_size: int) -> dict:
    from yunchang.globals import PROCESS_GROUP
    import torch.distributed as dist

    from xfuser.core.distributed import (
        get_cfg_group,
        get_ring_group,
        get_sp_group,
        get_ulysses_group,
        get_world_group,
        initialize_model_parallel,
    )

    initialize_model_parallel(ulysses_degree=2, ring_degree=2)
    world, sp = get_world_group(), get_sp_group()
    out: dict = {}
    out["all_reduce"] = world.all_reduce(torch.tensor([float(rank + 1)])).item()
    out["all_gather"] = sp.all_gather(torch.tensor([[rank]]), dim=1).tolist()
    # all_to_all: rank r holds [r*10 + j for j in 0..3]; after scatter dim 0 / gather dim 0,
    # rank r holds element r from every peer.
    a2a = sp.all_to_all(torch.arange(4.0) + 10 * rank, scatter_dim=0, gather_dim=0)
    out["all_to_all"] = a2a.tolist()
    b = torch.tensor([float(rank)])
    out["broadcast"] = get_ulysses_group().broadcast(b, src=1).item()
    # ring of isend/irecv over the world
    recv = torch.empty(1)
    send_work = world.isend(torch.tensor([float(rank)]), world.next_rank)
    world.wait(world.irecv(recv, world.prev_rank))
    world.wait(send_work)
    out["ring_recv"] = recv.item()
    # blocking send/recv on the ring group
    ring = get_ring_group()
    if ring.rank_in_group == 0:
        ring.send(torch.tensor([42.0 + rank]), dst=1)
        out["p2p"] = None
    else:
        out["p2p"] = ring.recv(torch.empty(1), src=0).item()
    world.barrier()
    out["cfg_size"] = get_cfg_group().world_size
    out["yunchang_ulysses"] = dist.get_process_group_ranks(PROCESS_GROUP.ULYSSES_PG)
    out["yunchang_ring"] = dist.get_process_group_ranks(PROCESS_GROUP.RING_PG)
    out["sp_bytes"] = sp.bytes_sent
    return out


def test_every_collective_on_gloo() -> None:
    run = run_on_ranks(_collectives, 4, timeout_s=90)
    for rank, out in enumerate(run.results):
        assert out["all_reduce"] == 10.0
        assert out["all_gather"] == [[0, 1, 2, 3]]
        assert out["all_to_all"] == [10.0 * src + rank for src in range(4)]
        assert out["broadcast"] == float((rank // 2) * 2 + 1)
        assert out["ring_recv"] == float((rank - 1) % 4)
        assert out["cfg_size"] == 1
        assert out["yunchang_ulysses"] == ([0, 1] if rank < 2 else [2, 3])
        assert out["yunchang_ring"] == ([0, 2] if rank % 2 == 0 else [1, 3])
        assert out["sp_bytes"] > 0
    assert run.results[2]["p2p"] == 42.0 and run.results[3]["p2p"] == 43.0


def _stuck_collective(rank: int, world_size: int) -> float | None:
    from xfuser.core.distributed import CollectiveTimeout, get_world_group, initialize_model_parallel

    initialize_model_parallel(dp_degree=2)
    world = get_world_group()
    world.timeout = __import__("datetime").timedelta(seconds=2)
    if rank == 0:  # rank 1 never joins this all_reduce
        start = time.monotonic()
        try:
            world.all_reduce(torch.ones(1))
        except CollectiveTimeout:
            return time.monotonic() - start
        return None
    time.sleep(4)
    return 0.0


def test_collective_timeout_fires_instead_of_hanging() -> None:
    run = run_on_ranks(_stuck_collective, 2, timeout_s=60, check_exitcodes=False)
    elapsed = run.results[0]
    assert elapsed is not None, "the all_reduce completed without its peer?"
    assert 1.5 <= elapsed < 10


def _one_run(rank: int, world_size: int) -> float:
    from xfuser.core.distributed import all_coordinators, initialize_model_parallel

    initialize_model_parallel(cfg_degree=2, ulysses_degree=2)
    total = 0.0
    for coordinator in all_coordinators().values():
        total += coordinator.all_reduce(torch.ones(1)).item()
    return total


@pytest.mark.slow  # 2 min: the 20 repeats; test_every_collective_on_gloo covers one clean teardown
def test_teardown_clean_in_20_repeated_4_rank_runs() -> None:
    codes = []
    for _ in range(20):
        run = run_on_ranks(_one_run, 4, timeout_s=90, check_exitcodes=False)
        codes.append(run.exitcodes)
        # world(4) + dp(1) + cfg(2) + pp(1) + sp(2) + ulysses(2) + ring(1) + cfg_sp(4)
        assert run.results == [17.0] * 4
    assert codes == [[0, 0, 0, 0]] * 20


def test_failing_rank_reports_its_traceback() -> None:
    from xfuser.testing.multiprocess import RankFailed

    with pytest.raises(RankFailed, match="ZeroDivisionError"):
        run_on_ranks(_divide_by_rank, 2, timeout_s=60)


def _divide_by_rank(rank: int, world_size: int) -> float:
    return 1 / rank
