"""One process group and every collective the runners need, each bounded by a timeout.

Why a wrapper: callers never touch ``torch.distributed`` directly, so (a) a group of size 1 is
a cheap no-op everywhere (single-process runs share the code path), (b) every collective is
issued asynchronously and waited on with a deadline, so a rank that disagrees raises
``CollectiveTimeout`` instead of hanging a cluster forever, and (c) bytes sent are counted
per group, which is how the benchmarks report communication volume.

A failed collective says what happened, because the two faults need different reactions:
``PeerLost`` (a subclass of ``CollectiveTimeout``) when the backend reports the connection to a
peer reset or closed, which on gloo arrives milliseconds after that peer's process died (look at
*its* log), and a plain ``CollectiveTimeout`` with ``reason == "timeout"`` when nothing arrived
within the timeout (a peer is alive but stuck, or took a different code path). Both carry the
group, the operation, the peer ranks and the elapsed time. :func:`collective_error` builds them
from a backend exception; the USP attention wrapper uses it for the collectives yunchang issues.
"""
from __future__ import annotations

import datetime
import re
import time
from collections.abc import Sequence

import torch
import torch.distributed as dist

from xfuser.logger import init_logger

logger = init_logger(__name__)

#: Seconds a steady-state collective may wait for its peers. The slowest legitimate wait once
#: every rank has joined is a PipeFusion stage waiting for the stages before it to compile their
#: blocks on the first step under ``--use_torch_compile`` (tens of seconds per stage on a GPU);
#: everything else waits for one block's or one patch's compute (well under a second to a few
#: seconds). 120 s covers that with margin, and is what a user waits for a stuck job to end.
#: A peer that *dies* is noticed immediately on gloo (``PeerLost``) whatever the value; on NCCL
#: the hang lasts this long before the watchdog ends the process.
DEFAULT_COLLECTIVE_TIMEOUT_S = 120.0
#: Seconds the start-up may wait for every rank to arrive: the rendezvous, group creation and
#: the barrier that ends ``initialize_model_parallel``. A peer may still be loading a model
#: (minutes for a large checkpoint from a network disk), so this is much longer than the
#: steady-state timeout; it is never shorter than the timeout a caller asks for.
DEFAULT_STARTUP_TIMEOUT_S = 600.0


class CollectiveTimeout(RuntimeError):
    """A collective did not complete: a peer is stuck, diverged, or is gone.

    Fields (``None``/empty when unknown): ``group`` (its name), ``op``, ``ranks`` (the group's
    global ranks), ``peers`` (the global ranks this rank was waiting on), ``global_rank`` (this
    rank), ``elapsed_s``, ``timeout_s`` and ``reason``: ``"timeout"`` (nothing arrived within
    the timeout), ``"peer_lost"`` (see :class:`PeerLost`) or ``"error"`` (another backend error).
    """

    reason = "timeout"

    def __init__(
        self,
        message: str,
        *,
        group: str | None = None,
        op: str | None = None,
        ranks: Sequence[int] = (),
        peers: Sequence[int] = (),
        global_rank: int | None = None,
        elapsed_s: float | None = None,
        timeout_s: float | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.group, self.op, self.global_rank = group, op, global_rank
        self.ranks, self.peers = list(ranks), list(peers)
        self.elapsed_s, self.timeout_s = elapsed_s, timeout_s
        if reason is not None:
            self.reason = reason

    def __reduce__(self):  # keyword-only fields survive pickling (multiprocessing, torch.save)
        fields = dict(group=self.group, op=self.op, ranks=self.ranks, peers=self.peers, global_rank=self.global_rank,
                      elapsed_s=self.elapsed_s, timeout_s=self.timeout_s, reason=self.reason)
        return _rebuild, (type(self), str(self), fields)


class PeerLost(CollectiveTimeout):
    """The connection to a peer was reset or closed mid-collective: that peer's process exited
    or crashed (its own log has the cause). Raised as soon as the backend notices, usually long
    before the timeout."""

    reason = "peer_lost"


def _rebuild(cls, message, fields):
    return cls(message, **fields)


#: backend texts (lower case) meaning the other end went away: gloo's tcp transport
#: ("Connection reset by peer", "Connection closed by peer", read/write errors on a dead
#: socket), NCCL's remote errors
_PEER_LOST = ("connection reset", "connection closed", "closed by peer", "broken pipe", "connection refused",
              "socket closed", "read error", "write error", "remote process exited", "ncclremoteerror",
              "end of file")
#: texts meaning the deadline passed (gloo: "Timed out waiting 5000ms for recv operation",
#: work.wait: "Operation timed out!", NCCL watchdog: "... ran for X milliseconds before timing out")
_TIMED_OUT = ("timed out", "timeout", "timing out")


def _backend_text(exc: BaseException) -> str:
    """The first line of the backend's message without its C++ source location."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)  # "[.../gloo/transport/tcp/pair.cc:537] "
    return text.split(". This is typically")[0].strip()


def classify(exc: BaseException, elapsed_s: float | None = None, timeout_s: float | None = None) -> str | None:
    """``"peer_lost"``, ``"timeout"`` or ``"error"`` for a communication failure; ``None`` when
    ``exc`` does not look like one (callers re-raise it unchanged)."""
    text = str(exc).lower()
    if any(p in text for p in _PEER_LOST):
        return "peer_lost"
    if any(p in text for p in _TIMED_OUT):
        return "timeout"
    if isinstance(exc, dist.DistError) or "gloo" in text or "nccl" in text:
        if elapsed_s is not None and timeout_s and elapsed_s >= 0.9 * timeout_s:
            return "timeout"
        return "error"
    return None


def collective_error(
    exc: BaseException,
    *,
    group: str,
    op: str,
    ranks: Sequence[int],
    peers: Sequence[int],
    global_rank: int,
    elapsed_s: float,
    timeout_s: float,
    force: bool = False,
) -> CollectiveTimeout | None:
    """The :class:`CollectiveTimeout` / :class:`PeerLost` describing ``exc``, raised by the
    backend during ``op`` on ``group``; ``None`` when ``exc`` is not a communication failure
    (unless ``force``: an error from waiting on a collective's handle always is one)."""
    reason = classify(exc, elapsed_s, timeout_s)
    if reason is None:
        if not force:
            return None
        reason = "timeout" if elapsed_s >= 0.9 * timeout_s else "error"
    peers = list(peers)
    where = f"{op} on group '{group}' (global ranks {list(ranks)})"
    timing = f"after {elapsed_s:.1f}s (timeout {timeout_s:g}s) on global rank {global_rank}"
    if reason == "peer_lost":
        head = f"peer lost: {where} failed {timing}: the connection to peer rank(s) {peers} was reset or closed, "
        head += "so a peer process exited or crashed; its own log has the cause"
    elif reason == "timeout":
        head = f"collective timeout: {where} did not finish {timing}: no data from peer rank(s) {peers} in time, "
        head += "so a peer is stuck or took a different code path"
    else:
        head = f"collective failed: {where} failed {timing} with a backend error involving peer rank(s) {peers}"
    cls = PeerLost if reason == "peer_lost" else CollectiveTimeout
    return cls(f"{head} [{_backend_text(exc)}]", group=group, op=op, ranks=ranks, peers=peers,
               global_rank=global_rank, elapsed_s=elapsed_s, timeout_s=timeout_s, reason=reason)


class GroupCoordinator:
    """A named process group: its global ranks, this rank's place in it, and its collectives.

    ``ranks`` are global ranks in group order; ``rank_in_group`` is this process's index in
    that order. Peer arguments (``src``, ``dst``) are group-local indices.
    """

    def __init__(
        self,
        name: str,
        ranks: Sequence[int],
        group: dist.ProcessGroup | None,
        global_rank: int,
        timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S,
        device: torch.device | str = "cpu",
    ) -> None:
        if global_rank not in ranks:
            raise ValueError(f"rank {global_rank} is not a member of group {name} {list(ranks)}")
        self.name = name
        self.ranks = list(ranks)
        self.group = group
        self.global_rank = global_rank
        self.rank_in_group = self.ranks.index(global_rank)
        self.world_size = len(self.ranks)
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.device = torch.device(device)  # where this backend wants its tensors (NCCL: the local GPU)
        self.bytes_sent = 0
        self.num_collectives = 0

    # ------------------------------------------------------------------ topology helpers
    @property
    def is_first_rank(self) -> bool:
        return self.rank_in_group == 0

    @property
    def is_last_rank(self) -> bool:
        return self.rank_in_group == self.world_size - 1

    @property
    def next_rank(self) -> int:
        """Group-local index of the next peer in a ring (used by PipeFusion stages)."""
        return (self.rank_in_group + 1) % self.world_size

    @property
    def prev_rank(self) -> int:
        return (self.rank_in_group - 1) % self.world_size

    def reset_counters(self) -> None:
        self.bytes_sent = 0
        self.num_collectives = 0

    # ------------------------------------------------------------------ internals
    def _peers(self, peer: int | None = None) -> list[int]:
        """Global ranks this rank waits on: the one P2P peer, else every other member."""
        if peer is not None:
            return [self._global(peer)]
        return [r for r in self.ranks if r != self.global_rank]

    def _fail(self, exc: BaseException, what: str, start: float, peer: int | None = None,
              force: bool = True) -> BaseException:
        """``exc`` as a :class:`CollectiveTimeout` / :class:`PeerLost` (logged now: under torchrun
        the agent may terminate this rank before its traceback prints); ``exc`` itself when not
        ``force`` and it is no communication failure (e.g. a wrong tensor at issue time)."""
        error = collective_error(
            exc, group=self.name, op=what, ranks=self.ranks, peers=self._peers(peer), global_rank=self.global_rank,
            elapsed_s=time.monotonic() - start, timeout_s=self.timeout.total_seconds(), force=force,
        )
        if error is None:
            return exc
        logger.error("%s", error)
        return error

    def _run(self, issue, what: str, peer: int | None = None) -> None:
        """Issue a collective (``issue()`` returns its handle) and wait on it with the timeout;
        a backend failure at either point becomes :class:`CollectiveTimeout` / :class:`PeerLost`."""
        start = time.monotonic()
        try:
            work = issue()
        except RuntimeError as exc:
            error = self._fail(exc, what, start, peer, force=False)
            if error is exc:
                raise
            raise error from exc
        self._wait(work, what, peer, start)

    def _wait(self, work, what: str, peer: int | None = None, start: float | None = None) -> None:
        start = time.monotonic() if start is None else start
        try:
            work.wait(timeout=self.timeout)
        except RuntimeError as exc:  # gloo: RuntimeError / DistBackendError; any failed wait is the collective's
            raise self._fail(exc, what, start, peer) from exc

    def _count(self, tensor: torch.Tensor, factor: float = 1.0) -> None:
        self.num_collectives += 1
        self.bytes_sent += int(tensor.numel() * tensor.element_size() * factor)

    def _global(self, local: int) -> int:
        return self.ranks[local]

    # ------------------------------------------------------------------ collectives
    def all_reduce(self, tensor: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
        """In-place reduction (SUM by default: gloo has no AVG); returns ``tensor``."""
        if self.world_size == 1:
            return tensor
        self._count(tensor, 2.0 * (self.world_size - 1) / self.world_size)
        self._run(lambda: dist.all_reduce(tensor, op=op, group=self.group, async_op=True), "all_reduce")
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Concatenate every rank's ``tensor`` along ``dim`` in group order."""
        if self.world_size == 1:
            return tensor
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        self._count(tensor, self.world_size - 1)
        self._run(lambda: dist.all_gather(parts, tensor, group=self.group, async_op=True), "all_gather")
        return torch.cat(parts, dim=dim)

    def all_gather_object(self, obj) -> list:
        """Gather a picklable object from every rank (debug paths only: it is slow)."""
        if self.world_size == 1:
            return [obj]
        out: list = [None] * self.world_size
        # object collectives have no async handle; the group's own timeout bounds them.
        start = time.monotonic()
        try:
            dist.all_gather_object(out, obj, group=self.group)
        except RuntimeError as exc:
            raise self._fail(exc, "all_gather_object", start) from exc
        self.num_collectives += 1
        return out

    def all_to_all(self, tensor: torch.Tensor, scatter_dim: int, gather_dim: int) -> torch.Tensor:
        """Split ``tensor`` along ``scatter_dim`` across ranks and concatenate what arrives
        along ``gather_dim`` (the Ulysses exchange)."""
        if self.world_size == 1:
            return tensor
        if tensor.shape[scatter_dim] % self.world_size:
            raise ValueError(
                f"all_to_all on '{self.name}': dim {scatter_dim} of size {tensor.shape[scatter_dim]} "
                f"is not divisible by the group size {self.world_size}"
            )
        inputs = [t.contiguous() for t in torch.chunk(tensor, self.world_size, dim=scatter_dim)]
        outputs = [torch.empty_like(t) for t in inputs]
        self._count(tensor, (self.world_size - 1) / self.world_size)
        flat_in = torch.cat([t.reshape(-1) for t in inputs])
        flat_out = torch.empty_like(flat_in)
        self._run(lambda: dist.all_to_all_single(flat_out, flat_in, group=self.group, async_op=True), "all_to_all")
        for i, chunk in enumerate(torch.chunk(flat_out, self.world_size)):
            outputs[i] = chunk.view_as(outputs[i])
        return torch.cat(outputs, dim=gather_dim)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """In-place broadcast from group-local ``src``; returns ``tensor``."""
        if self.world_size == 1:
            return tensor
        if self.rank_in_group == src:
            self._count(tensor, self.world_size - 1)
        self._run(lambda: dist.broadcast(tensor, src=self._global(src), group=self.group, async_op=True), "broadcast",
                  None if self.rank_in_group == src else src)
        return tensor

    def isend(self, tensor: torch.Tensor, dst: int) -> "P2PWork":
        """Non-blocking send to group-local ``dst``; finish with ``wait(work)``."""
        self._count(tensor)
        return self._p2p(lambda: dist.isend(tensor.contiguous(), dst=self._global(dst), group=self.group), "isend", dst)

    def irecv(self, tensor: torch.Tensor, src: int) -> "P2PWork":
        """Non-blocking receive into ``tensor`` from group-local ``src``; finish with ``wait(work)``."""
        return self._p2p(lambda: dist.irecv(tensor, src=self._global(src), group=self.group), "irecv", src)

    def _p2p(self, issue, what: str, peer: int) -> "P2PWork":
        start = time.monotonic()
        try:
            return P2PWork(issue(), peer)
        except RuntimeError as exc:  # a pair already known dead fails at issue time
            error = self._fail(exc, what, start, peer, force=False)
            if error is exc:
                raise
            raise error from exc

    def wait(self, work, what: str = "p2p") -> None:
        """Wait on a handle from ``isend``/``irecv`` under this group's timeout."""
        self._wait(work, what, getattr(work, "peer", None))

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        self.wait(self.isend(tensor, dst), "send")

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        self.wait(self.irecv(tensor, src), "recv")
        return tensor

    def barrier(self) -> None:
        if self.world_size == 1:
            return
        # a barrier is an all_reduce of one element: it then has a handle we can time out.
        self.all_reduce(torch.zeros(1, device=self.device))

    def __repr__(self) -> str:
        return f"GroupCoordinator({self.name}, ranks={self.ranks}, me={self.rank_in_group})"


class P2PWork:
    """A handle from :meth:`GroupCoordinator.isend`/``irecv`` that remembers its peer
    (group-local), so a failed wait names it."""

    __slots__ = ("work", "peer")

    def __init__(self, work, peer: int) -> None:
        self.work, self.peer = work, peer

    def wait(self, timeout: datetime.timedelta | None = None) -> bool:
        return self.work.wait() if timeout is None else self.work.wait(timeout=timeout)

    def is_completed(self) -> bool:
        return self.work.is_completed()
