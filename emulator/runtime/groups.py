"""Rank topology, process groups, and timed collectives.

A rank sits at mesh coordinates ``(dp, pp, tp)`` given by the layout; everything here is
derived from ``layout.rank_coords`` so that the driver and every worker agree on it.
Process groups: the world group, then one subgroup per axis of size > 1; torch requires
every rank to call ``new_group`` for every group, in the same order, even for groups it
is not in (the order below is a pure function of the layout).

:class:`TimedCollectives` wraps the torch ops: each call is timed (entry/exit on the
node's monotonic clock), recorded, numbered by its position in the step program (for
diagnosing hangs, see records.CollectiveState), and may be skipped once by a debug hook.
It also times the step's compute delays (:meth:`TimedCollectives.compute`): a delay starts
when the rank's previous op ended and is waited out only by the op after it, once that op's
own bookkeeping is done. A GPU runs its kernels while the host prepares the next launch; so
here the rank's Python between two ops (recording one, dispatching the next: measured on the
development VM, ~10 us from a collective's exit to the next delay and ~7 us from a delay's
end to the next collective's entry, most of it code run cold after a sleep) runs inside the
delay instead of adding to the step.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from emulator.runtime.ray_setup import LayoutLike
from emulator.runtime.records import AXES, OPS, CollectiveState, StepRecorder

PROCESS_GROUP_AXES = ("tp", "pp", "dp", "ep")
"""Axes that get a subgroup when their degree is > 1, in creation order."""


@dataclass(frozen=True, slots=True)
class RankTopology:
    """One rank's place in the mesh and its peers."""

    rank: int
    world_size: int
    replica: int
    stage: int
    tp_index: int
    num_stages: int
    tp_ranks: tuple[int, ...]
    """Ranks of this rank's TP group, by TP index (just this rank when tp == 1)."""
    prev_stage_rank: int | None
    """Rank of the previous pipeline stage with the same (dp, tp) index; None on stage 0."""
    next_stage_rank: int | None
    """Rank of the next pipeline stage with the same (dp, tp) index; None on the last."""
    ep_ranks: tuple[int, ...] = ()
    """Ranks of this rank's expert-parallel group in EP order (just this rank when ep == 1)."""
    ep_index: int = 0
    """This rank's position in ep_ranks: it holds expert slots ep_index * S/ep onward."""


def world_size_of(layout: LayoutLike) -> int:
    return layout.dp * layout.pp * layout.tp


def coords_to_rank(layout: LayoutLike) -> dict[tuple[int, int, int], int]:
    """(dp, pp, tp) -> rank for every rank of the layout."""
    return {tuple(layout.rank_coords(r)): r for r in range(world_size_of(layout))}


def stage_ranks(layout: LayoutLike, replica: int) -> list[list[int]]:
    """Per pipeline stage of DP replica ``replica``, its ranks ordered by TP index."""
    by_coords = coords_to_rank(layout)
    return [[by_coords[(replica, s, t)] for t in range(layout.tp)] for s in range(layout.pp)]


def rank_topology(layout: LayoutLike, rank: int) -> RankTopology:
    dp, pp, tp = layout.rank_coords(rank)
    by_coords = coords_to_rank(layout)
    ep_ranks = (rank,)
    if getattr(layout, "ep", 1) > 1:
        ep_ranks = next(tuple(g) for g in layout.groups("ep") if rank in g)
    return RankTopology(
        rank=rank, world_size=world_size_of(layout), replica=dp, stage=pp, tp_index=tp,
        num_stages=layout.pp,
        tp_ranks=tuple(by_coords[(dp, pp, t)] for t in range(layout.tp)),
        prev_stage_rank=by_coords[(dp, pp - 1, tp)] if pp > 0 else None,
        next_stage_rank=by_coords[(dp, pp + 1, tp)] if pp + 1 < layout.pp else None,
        ep_ranks=ep_ranks, ep_index=ep_ranks.index(rank))


def axis_groups(layout: LayoutLike, axis: str) -> list[list[int]]:
    """All groups along ``axis`` in a fixed order (ranks that differ only in that axis)."""
    if axis == "ep":
        return [list(g) for g in layout.groups("ep")]
    index = {"dp": 0, "pp": 1, "tp": 2}[axis]
    groups: dict[tuple[int, ...], list[int]] = {}
    for rank in range(world_size_of(layout)):
        coords = list(layout.rank_coords(rank))
        coords[index] = -1
        groups.setdefault(tuple(coords), []).append(rank)
    return [sorted(g, key=lambda r: layout.rank_coords(r)[index]) for g in groups.values()]


def init_process_groups(layout: LayoutLike, rank: int, *, backend: str, master_addr: str,
                        master_port: int, timeout_s: float) -> dict[str, Any]:
    """Join the world group and create every axis subgroup; return axis -> this rank's group
    (plus "world" -> None, torch's handle for the default group). Must run concurrently on
    all ranks (the rendezvous blocks until all have joined)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}",
                            rank=rank, world_size=world_size_of(layout), timeout=timeout)
    mine: dict[str, Any] = {"world": None}
    for axis in PROCESS_GROUP_AXES:
        if getattr(layout, axis, 1) <= 1:
            continue
        for ranks in axis_groups(layout, axis):
            group = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                mine[axis] = group
    return mine


@dataclass(slots=True)
class _StepProgress:
    step_key: object = None
    position: int = 0
    blocked: bool = False
    done: bool = True
    entered_tp: list[int] = field(default_factory=list)
    entered_pp: list[tuple[int, int]] = field(default_factory=list)
    ops: dict[int, tuple[str, str, int]] = field(default_factory=dict)
    error: str = ""


PAST_STEPS = 4
"""Finished steps whose collective progress a rank keeps (TimedCollectives.state)."""


class TimedCollectives:
    """Timed, recorded torch collectives for one rank. Not thread-safe for two steps at
    once (the worker runs steps on one thread); ``state()`` may be read from another."""

    def __init__(self, rank: int, groups: dict[str, Any], device: torch.device,
                 clock: Callable[[], float], synchronize: Callable[[], None],
                 delay: Callable[[float], object]) -> None:
        self.rank = rank
        self._groups = groups
        self._device = device
        self._clock = clock
        # On CUDA the op is asynchronous; synchronizing makes the exit time the real one.
        self._synchronize = synchronize
        self._buffers: dict[tuple[str, int], torch.Tensor] = {}
        self._views: dict[str, tuple[int, torch.Tensor]] = {}
        """Per purpose, the last view :meth:`buffer` returned and its size."""
        self._skip_next = False
        self._progress = _StepProgress()
        self._past: dict[object, _StepProgress] = {}
        """The progress of the last PAST_STEPS steps before the current one, by step key:
        with plans queued on the actor a rank may be a step further on by the time the
        driver asks about a failed one."""
        self.recorder = StepRecorder()
        self.delay = delay
        """Waits out a compute delay of ``seconds`` (the worker's delay function; the
        worker replaces it when its host mode changes how delays are waited)."""
        self.ready_s = 0.0
        """When this rank's last op of the step ended (its clock): the step's start, a
        collective's exit, a compute delay's end or :meth:`settle`'s caller's real work."""
        self._pending: tuple[int, int, float, float] | None = None
        """(kind, layer, start_s, deadline_s) of the compute delay not yet waited out."""

    # -- compute delays -------------------------------------------------------------------
    def compute(self, kind: int, layer: int, seconds: float) -> None:
        """A compute delay of ``seconds`` from ``ready_s`` (the end of the previous op, a
        previous delay waited out first). Its wait happens in the next op (:meth:`settle`)."""
        if self._pending is not None:
            self.settle()
        start_s = self.ready_s
        self._pending = (kind, layer, start_s, start_s + seconds)

    def settle(self) -> None:
        """Wait until the pending compute delay's deadline and record it. A delay whose
        deadline passed before this call is recorded as ending at its deadline; the late
        time after it stays outside (control overhead, not compute)."""
        row = self._wait()
        if row is not None:
            self.recorder.add_compute(*row)

    def _wait(self) -> tuple[int, int, float, float] | None:
        """:meth:`settle` without the recording: the row to record, or None."""
        pending = self._pending
        if pending is None:
            return None
        self._pending = None
        kind, layer, start_s, deadline_s = pending
        now_s = self._clock()
        if deadline_s > now_s:
            self.delay(deadline_s - now_s)
            end_s = ready_s = self._clock()
        else:
            end_s, ready_s = deadline_s, now_s
        self.ready_s = ready_s
        return kind, layer, start_s, end_s

    # -- step lifecycle -------------------------------------------------------------------
    def begin_step(self, step_key: object) -> StepRecorder:
        done = self._progress
        if done.step_key is not None:
            self._past.pop(done.step_key, None)
            self._past[done.step_key] = done
            while len(self._past) > PAST_STEPS:
                del self._past[next(iter(self._past))]
        self._progress = _StepProgress(step_key=step_key, done=False)
        self.recorder = StepRecorder()
        self._pending = None
        self.ready_s = self._clock()
        return self.recorder

    def end_step(self) -> None:
        self.settle()
        self._progress.done = True

    def fail_step(self, exc: BaseException) -> None:
        self._progress.error = (str(exc).strip().splitlines() or [type(exc).__name__])[0]

    def skip_next_collective(self) -> None:
        """Debug hook: the next collective of this rank is not called (fault injection)."""
        self._skip_next = True

    def state(self, step_key: object = None) -> CollectiveState:
        """The progress of step ``step_key`` if it is the current step or one of the last
        PAST_STEPS, else (or with None) of the current step."""
        p = self._progress
        if step_key is not None and step_key != p.step_key:
            p = self._past.get(step_key, p)
        return CollectiveState(
            rank=self.rank, step_key=p.step_key, position=p.position, blocked=p.blocked,
            done=p.done, entered_tp=list(p.entered_tp), entered_pp=list(p.entered_pp),
            ops=dict(p.ops), error=p.error)

    # -- buffers --------------------------------------------------------------------------
    def buffer(self, purpose: str, num_bytes: int) -> torch.Tensor:
        """A zero tensor of exactly ``num_bytes`` (bf16 when even, else uint8): a view of
        one buffer per purpose, grown to the largest size asked for. (A buffer per distinct
        size would grow without bound: every step has its own token count.) Zeros stay
        zeros under summation, so reused buffers never overflow to inf/NaN."""
        last = self._views.get(purpose)
        if last is not None and last[0] == num_bytes:
            return last[1]  # a step's all-reduces share one size: slicing costs ~10 us
        buf = self._buffers.get(purpose)
        if buf is None or buf.numel() < num_bytes:
            buf = torch.zeros(max(num_bytes, 2), dtype=torch.uint8, device=self._device)
            self._buffers[purpose] = buf
        view = buf[:num_bytes]
        view = view.view(torch.bfloat16) if num_bytes % 2 == 0 else view
        self._views[purpose] = (num_bytes, view)
        return view

    # -- ops ------------------------------------------------------------------------------
    def _run(self, op: str, axis: str, layer: int, peer: int, num_bytes: int, call) -> None:
        p = self._progress
        position = p.position
        if self._skip_next:
            self._skip_next = False
            self.settle()
            p.position += 1
            return
        # The progress marks go first: they are bookkeeping, run inside the pending delay
        # (a hang is diagnosed seconds later, long after any delay has ended).
        p.ops[position] = (op, axis, layer)
        if op in ("send", "recv"):
            p.entered_pp.append((self.rank, peer) if op == "send" else (peer, self.rank))
        else:
            p.entered_tp.append(position)
        p.blocked = True
        row = self._wait()  # recorded after the call: inside the next delay
        entry_s = self._clock()
        call()
        self._synchronize()
        exit_s = self.ready_s = self._clock()
        p.blocked = False
        p.position += 1
        if row is not None:
            self.recorder.add_compute(*row)
        self.recorder.add_collective(OPS.index(op), AXES.index(axis), layer, peer, num_bytes,
                                     entry_s, exit_s)

    def all_reduce(self, axis: str, num_bytes: int, layer: int) -> None:
        buf = self.buffer("act", num_bytes)
        self._run("all_reduce", axis, layer, -1, num_bytes,
                  lambda: dist.all_reduce(buf, group=self._groups[axis]))

    def all_gather(self, axis: str, num_bytes: int, layer: int, group_size: int) -> None:
        shard = self.buffer("gather_in", num_bytes)
        out = self.buffer("gather_out", num_bytes * group_size)
        self._run("all_gather", axis, layer, -1, num_bytes,
                  lambda: dist.all_gather_single(out, shard, group=self._groups[axis]))

    def rows(self, purpose: str, num_rows: int, row_bytes: int) -> torch.Tensor:
        """A ``[num_rows, row_bytes]`` uint8 view of a grow-only buffer (contiguous, as
        all_to_all_single needs); rows of all-to-alls vary from call to call."""
        need = num_rows * row_bytes
        buf = self._buffers.get((purpose, -1))
        if buf is None or buf.numel() < need:
            buf = torch.zeros(max(need, 1), dtype=torch.uint8, device=self._device)
            self._buffers[(purpose, -1)] = buf
        return buf[:need].view(num_rows, row_bytes)

    def all_to_all(self, axis: str, layer: int, send_rows: list[int], recv_rows: list[int],
                   row_bytes: int, own_index: int) -> tuple[int, int]:
        """``all_to_all_single`` with uneven splits: ``send_rows[j]`` rows of ``row_bytes``
        go to the j-th member of the group, ``recv_rows[j]`` come from it. Recorded bytes:
        what this rank sends to the *other* members (its own chunk does not cross the
        wire). Returns (rows in the input tensor, rows in the output tensor)."""
        inp = self.rows("a2a_in", sum(send_rows), row_bytes)
        out = self.rows("a2a_out", sum(recv_rows), row_bytes)
        sent = (sum(send_rows) - send_rows[own_index]) * row_bytes
        self._run("all_to_all", axis, layer, -1, sent,
                  lambda: dist.all_to_all_single(out, inp, list(recv_rows), list(send_rows),
                                                 group=self._groups[axis]))
        return int(inp.shape[0]), int(out.shape[0])

    def send(self, dst: int, num_bytes: int) -> None:
        buf = self.buffer("act", num_bytes)
        self._run("send", "pp", -1, dst, num_bytes, lambda: dist.send(buf, dst=dst))

    def recv(self, src: int, num_bytes: int) -> None:
        buf = self.buffer("act", num_bytes)
        self._run("recv", "pp", -1, src, num_bytes, lambda: dist.recv(buf, src=src))
