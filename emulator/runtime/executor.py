"""The emulation loop: the same schedulers and router as the simulator, driven in real time,
with every plan executed by the Ray workers (real delays, real collectives, real KV writes).

Time: the loop's clock is the driver's monotonic clock minus its start, divided by
``dilation`` (target seconds). A request arrives at ``arrival_s * dilation`` host seconds;
a plan is submitted to all ranks of its replica with one round of Ray calls, and its step
ends when the last stage's ranks finish; the scheduler learns of it then. With PP, up to
``pp`` plans per replica are in flight (queued on the stage-0 actors); DP replicas run
concurrently.

Running ahead (``RunConfig.run_ahead``): once every request has arrived, a plan's outcome
no longer depends on when its step ends (the scheduler's decisions depend on the arrivals
it has seen, never on the clock), and a replica's plans finish in submission order. So when
every slot of a replica holds a plan in flight (one slot, or ``pp`` with micro-batches),
the driver applies the oldest to the scheduler (``on_plan_done``) at once, forms the plan
that would follow its completion and submits it too: it waits in the actors' queues and
starts as soon as the step before it ends, instead of a driver round trip later. The
scheduler sees the same calls in the same order as without (the same plans, which the
simulator forms too); only the first-token and finish times of the plan applied ahead wait
for its step to end (NaN in tables taken meanwhile). One plan per replica is applied ahead
at a time.

Crash safety: records of finished steps stay in ``self.steps`` / ``self.collectives`` and
``self.requests``. ``run(on_checkpoint=...)`` hands ``tables()`` to the caller every
``checkpoint_interval_s`` (the CLI writes them with ``complete: false``), and ``emulate``
hands them to ``on_partial`` before re-raising a failure, so an interrupted run keeps what it
measured. A step fails as soon as one of its ranks fails (cluster.WorkerGroup.poll).

Test hook: ``EMULATOR_FAULT`` arms one injected fault (see runtime/faults.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import ray

from emulator.build import RunSetup
from emulator.core.plan import BatchPlan
from emulator.errors import RunError
from emulator.metrics.records import CollectiveRecords, StepRecords
from emulator.runtime.awake import HostMode
from emulator.runtime.cluster import PendingStep, WorkerGroup
from emulator.runtime.faults import fault_from_env, inject
from emulator.runtime.records import AXES, OPS
from emulator.runtime.records import StepRecords as RankRecords
from emulator.runtime.shards import ELEMENT_BYTES, stage_weight_shapes
from emulator.simulator.run import RunTables, request_table, run_extra

_OPS = np.array(OPS, dtype=object)
_AXES = np.array(AXES, dtype=object)


@dataclass
class _InFlight:
    plan: BatchPlan
    pending: PendingStep
    kv_blocks_used: int
    applied: tuple[np.ndarray, np.ndarray] | None = None
    """(requests with their first token in this plan, requests it finished) once the plan
    was applied to the scheduler ahead of its step's end (Emulation._apply_ahead)."""


_AHEAD_S = -1.0
"""The end time a plan applied ahead is stamped with until its step ends (then replaced)."""


@dataclass
class ControlStats:
    """Where the driver's wall time went (host seconds)."""

    wall_s: float = 0.0
    num_steps: int = 0
    schedule_s: float = 0.0
    """Scheduling, pricing and record keeping on the driver."""
    idle_s: float = 0.0
    """Sleeping with nothing in flight, waiting for the next arrival."""
    checkpoint_s: float = 0.0
    """Building and handing over the tables at checkpoints (the loop waits meanwhile)."""
    num_checkpoints: int = 0
    per_rank_compute_s: list[float] = field(default_factory=list)


class Emulation:
    """One emulated run on an existing WorkerGroup; call :meth:`run` once."""

    def __init__(self, setup: RunSetup, group: WorkerGroup) -> None:
        self.setup = setup
        self.group = group
        self.dilation = setup.config.dilation
        self.requests = setup.new_requests()
        self.schedulers = setup.new_schedulers(self.requests)
        self.router = setup.new_router()
        self.steps = StepRecords()
        self.collectives = CollectiveRecords()
        self.stats = ControlStats()
        self.t0 = 0.0
        self._fault = None  # EMULATOR_FAULT, armed by run()
        self.host_mode: list[dict] = []
        """Per rank, how it waits (Worker.set_host_mode's report); set by allocate()."""
        self._order = np.argsort(self.requests.arrival_s, kind="stable")
        self._next = 0
        pp = setup.layout.pp
        self._run_ahead = bool(setup.config.run_ahead)
        self._free_slots = [list(range(pp)) for _ in self.schedulers]
        self._inflight: list[_InFlight] = []
        # Blocks in use per replica at the last submission: freed ones are released on the
        # workers before the next step writes into the pool.
        self._used = [np.zeros(s.kv_blocks_total, bool) for s in self.schedulers]

    # ---- set-up -------------------------------------------------------------------------
    def allocate(self) -> list:
        """Weight shards and the KV pool on every rank (real tensors x memory_scale), and
        how the ranks wait (delays spun or slept, idle-priority spinners, CPU priority; see
        WorkerGroup.set_host_mode, reported per rank in the tables' ``extra["host_mode"]``)."""
        setup, cfg = self.setup, self.setup.config
        self.host_mode = self.group.set_host_mode(HostMode.of(cfg))
        return self.group.allocate(
            [], setup.memory.num_kv_blocks,
            setup.memory.kv_bytes_per_block_per_rank // ELEMENT_BYTES, cfg.memory_scale,
            kv_block_size_tokens=cfg.block_size,
            stage_weight_shapes=stage_weight_shapes(setup.model, setup.layout))

    # ---- clock --------------------------------------------------------------------------
    def _now_s(self) -> float:
        return (time.monotonic() - self.t0) / self.dilation

    def _to_target(self, host_s: np.ndarray | float):
        return (host_s - self.t0) / self.dilation

    # ---- loop ---------------------------------------------------------------------------
    def run(self, on_progress: Callable[[int], None] | None = None, *,
            on_checkpoint: Callable[[RunTables], None] | None = None,
            checkpoint_interval_s: float = 30.0) -> None:
        """Emulate the whole trace. ``on_checkpoint(tables())`` is called about every
        ``checkpoint_interval_s`` host seconds while the run lasts."""
        self.t0 = time.monotonic()
        n = len(self.requests)
        self._fault = fault_from_env()
        next_checkpoint = self.t0 + checkpoint_interval_s
        while True:
            if on_checkpoint is not None and time.monotonic() >= next_checkpoint:
                tick = time.monotonic()
                on_checkpoint(self.tables())
                self.stats.checkpoint_s += time.monotonic() - tick
                self.stats.num_checkpoints += 1
                next_checkpoint = time.monotonic() + checkpoint_interval_s
            now_s = self._admit()
            tick = time.monotonic()
            for r in range(len(self.schedulers)):
                self._submit(r, now_s)
            self.stats.schedule_s += time.monotonic() - tick
            if not self._inflight:
                if self._next >= n:
                    if not any(s.has_work for s in self.schedulers):
                        for r in range(len(self.schedulers)):
                            self._release_freed_blocks(r)
                        break
                    raise RunError("the schedulers hold requests but form no plan with "
                                   "nothing in flight (a scheduler bug); stopping")
                wait_s = self.requests.arrival_s[self._order[self._next]] * self.dilation \
                    - (time.monotonic() - self.t0)
                if on_checkpoint is not None:
                    wait_s = min(wait_s, next_checkpoint - time.monotonic())
                if wait_s > 0:
                    time.sleep(wait_s)
                    self.stats.idle_s += wait_s
                continue
            finished = self._wait_and_complete()
            if finished and on_progress is not None:
                on_progress(finished)
        self.stats.wall_s = time.monotonic() - self.t0

    def _admit(self) -> float:
        """Hand every request that has arrived by now to its replica; returns now."""
        now_s = self._now_s()
        n = len(self.requests)
        while self._next < n and self.requests.arrival_s[self._order[self._next]] <= now_s:
            self._arrive(int(self._order[self._next]), now_s)
            self._next += 1
        return now_s

    def _arrive(self, idx: int, now_s: float) -> None:
        r = self.router.route_to(idx, self.schedulers)
        self.schedulers[r].add_request(idx, now_s)

    def _submit(self, r: int, now_s: float) -> None:
        sched, slots = self.schedulers[r], self._free_slots[r]
        if self._fault is not None and self.stats.num_steps >= self._fault.step:
            inject(self._fault, self.group)  # before the step it names is submitted
            self._fault = None
        while True:
            if not slots and not self._apply_ahead(r):
                return
            if not sched.has_work:
                return
            plan = sched.schedule(now_s, slots[0])
            if plan is None:
                return
            slots.pop(0)
            freed = self._freed_blocks(r)
            req = self.requests
            idx = plan.request_index
            work = self.setup.cost.step_work(
                plan, prompt_tokens=req.prompt_tokens[idx] + req.num_output_tokens[idx])
            pending = self.group.submit_replica_step(
                r, work, plan.new_slot_ids, self.dilation,
                step_key=(plan.step, plan.micro_batch),
                freed_blocks=None if freed is None else (freed, self.setup.config.block_size))
            self._inflight.append(_InFlight(plan, pending, sched.kv_blocks_used))

    def _apply_ahead(self, r: int) -> bool:
        """Run ahead (module docstring): if replica ``r`` may, apply its oldest plan in
        flight to its scheduler now and free its slot for the next plan; False if it may not
        (``run_ahead`` off, a request still to arrive, a slot still free, or a plan already
        applied ahead)."""
        if not self._run_ahead or self._next < len(self.requests):
            return False
        mine = [f for f in self._inflight if f.plan.replica == r]  # in submission order
        if len(mine) != self.setup.layout.pp or any(f.applied is not None for f in mine):
            return False
        f = mine[0]
        sched, req = self.schedulers[r], self.requests
        done = sched.on_plan_done(f.plan, _AHEAD_S)
        idx = f.plan.request_index
        first = idx[req.first_token_s[idx] == _AHEAD_S]
        req.first_token_s[first] = np.nan  # stamped when the step ends (_complete)
        req.finish_s[done] = np.nan
        f.applied = (first, done)
        self._free_slots[r].append(f.plan.micro_batch)
        self._free_slots[r].sort()
        return True

    def _freed_blocks(self, r: int) -> np.ndarray | None:
        """The blocks of replica ``r`` the KV manager freed since the last call (None if
        none). They travel with the replica's next plan (WorkerGroup.submit_replica_step's
        ``freed_blocks``), so they are released before its writes at no extra call."""
        used = self.schedulers[r].kv.pool.ref_cnt > 0
        freed = np.flatnonzero(self._used[r] & ~used)
        self._used[r] = used
        return freed if freed.size else None

    def _release_freed_blocks(self, r: int) -> None:
        """Tell the replica's ranks which blocks were freed after its last plan (at the end
        of the run). Fire-and-forget: actor calls run in submission order."""
        freed = self._freed_blocks(r)
        if freed is not None:
            bs = self.setup.config.block_size
            for rank in self._replica_ranks(r):
                self.group.actors[rank].free_kv_blocks.remote(freed, bs)

    def _replica_ranks(self, r: int) -> list[int]:
        lay = self.setup.layout
        return [lay.rank_of(r, p, t) for p in range(lay.pp) for t in range(lay.tp)]

    def _wait_and_complete(self) -> int:
        """Block until a rank reports, the next arrival is due, or a step's deadline passes;
        then complete every step whose ranks have all reported. Raises RunError as soon as
        a rank of any step failed, or past a step's deadline."""
        pending = [ref for f in self._inflight for ref in f.pending.waiting]
        now = time.monotonic()
        timeout_s = min(f.pending.deadline_s for f in self._inflight) - now
        if self._next < len(self.requests):
            due = self.t0 + self.requests.arrival_s[self._order[self._next]] * self.dilation
            timeout_s = min(timeout_s, due - now)
        ready = set(ray.wait(pending, num_returns=1, timeout=max(0.0, timeout_s))[0])
        if ready:
            # Collect everything else that is done too, without waiting.
            ready |= set(ray.wait(pending, num_returns=len(pending), timeout=0)[0])
        # Completions are handled one at a time, in submission order (a replica's plans
        # finish in that order), and the replica plans again after each, as the simulator
        # does at each completion event: when a slow driver finds several plans of a
        # replica done at once, the scheduler still sees the same states in the same order.
        finished = 0
        for f in list(self._inflight):  # _submit appends the new plans, polled next time
            if self.group.poll(f.pending, ready):  # raises RunError if a rank failed
                self._inflight.remove(f)
                finished += self._complete(f)
                now_s = self._admit()
                tick = time.monotonic()
                self._submit(f.plan.replica, now_s)
                self.stats.schedule_s += time.monotonic() - tick
            elif time.monotonic() >= f.pending.deadline_s:
                raise self.group.fail(f.pending)
        return finished

    def _complete(self, f: _InFlight) -> int:
        recs: list[RankRecords] = self.group.collect(f.pending)
        tick = time.monotonic()
        plan = f.plan
        r = plan.replica
        pp = self.setup.layout.pp
        stage_start = np.empty(pp)
        stage_end = np.empty(pp)
        stage_compute = np.zeros(pp)
        stage_comm = np.zeros(pp)
        for s in range(pp):
            mine = [x for x in recs if x.stage == s]
            starts = []
            for x in mine:
                # A receiving stage starts when its activations have arrived.
                recv = x.coll_op == OPS.index("recv")
                starts.append(x.coll_exit_s[recv].max() if recv.any() else x.start_s)
            stage_start[s] = max(starts)
            stage_end[s] = max(x.end_s for x in mine)
            stage_compute[s] = max(x.compute_s for x in mine)
            stage_comm[s] = max(float((x.coll_exit_s - x.coll_entry_s)[x.coll_op != OPS.index("recv")].sum())
                                for x in mine)
        end_s = float(self._to_target(stage_end[-1]))
        sched = self.schedulers[r]
        if f.applied is None:
            finished = sched.on_plan_done(plan, end_s)
            self._free_slots[r].append(plan.micro_batch)
            self._free_slots[r].sort()
        else:  # applied ahead: only its times were left to stamp
            first, finished = f.applied
            self.requests.first_token_s[first] = end_s
            self.requests.finish_s[finished] = end_s
        d = self.dilation
        for s in range(pp):
            self.steps.append(r, plan.step, s, float(self._to_target(stage_start[s])),
                              float(self._to_target(stage_end[s])), plan.num_requests,
                              plan.num_prefill_tokens, plan.num_decode_tokens,
                              stage_compute[s] / d, stage_comm[s] / d, f.kv_blocks_used,
                              sched.kv_blocks_total, micro_batch=plan.micro_batch)
        self._record_collectives(plan, recs)
        self.stats.num_steps += 1
        self.stats.schedule_s += time.monotonic() - tick
        return int(finished.size)

    def _record_collectives(self, plan: BatchPlan, recs: list[RankRecords]) -> None:
        lay = self.setup.layout
        r = plan.replica
        cols: dict[str, list[np.ndarray]] = {k: [] for k in (
            "rank", "stage", "layer", "axis", "op", "group", "seq", "bytes", "entry_s", "exit_s")}
        for x in recs:
            c = x.num_collectives
            if c == 0:
                continue
            _, stage, tp_index = lay.rank_coords(x.rank)
            ops = _OPS[x.coll_op]
            groups = np.empty(c, dtype=object)
            seq = np.zeros(c, np.int64)
            is_p2p = (ops == "send") | (ops == "recv")
            is_ep = ~is_p2p & (_AXES[x.coll_axis] == "ep")
            is_tp = ~is_p2p & ~is_ep
            groups[is_tp] = f"tp/dp{r}/pp{stage}"
            seq[is_tp] = np.arange(int(is_tp.sum()))
            # The emulator runs EP over the TP ranks of a stage (ep == tp) on a communicator
            # of its own, hence its own name and counter.
            groups[is_ep] = f"ep/dp{r}/pp{stage}"
            seq[is_ep] = np.arange(int(is_ep.sum()))
            send, recv = ops == "send", ops == "recv"
            groups[send] = f"pp/dp{r}/tp{tp_index}/{stage}>{stage + 1}"
            groups[recv] = f"pp/dp{r}/tp{tp_index}/{stage - 1}>{stage}"
            # numbered per direction, as the group ops: the k-th transfer of the step
            seq[send] = np.arange(int(send.sum()))
            seq[recv] = np.arange(int(recv.sum()))
            cols["rank"].append(np.full(c, x.rank))
            cols["stage"].append(np.full(c, stage))
            cols["layer"].append(x.coll_layer)
            cols["axis"].append(_AXES[x.coll_axis])
            cols["op"].append(ops)
            cols["group"].append(groups)
            cols["seq"].append(seq)
            cols["bytes"].append(x.coll_bytes)
            cols["entry_s"].append(self._to_target(x.coll_entry_s))
            cols["exit_s"].append(self._to_target(x.coll_exit_s))
        self._record_moe(plan, recs)
        if not cols["rank"]:
            return
        merged = {k: np.concatenate(v) for k, v in cols.items()}
        n = merged["rank"].size
        merged.update(replica=np.full(n, r), step=np.full(n, plan.step),
                      micro_batch=np.full(n, plan.micro_batch))
        self.collectives.extend(merged)

    def _record_moe(self, plan: BatchPlan, recs: list[RankRecords]) -> None:
        """moe.parquet rows of the plan's EP layers (metrics.moe), in ``self.moe_records``."""
        from emulator.metrics.moe import MoeRecords, RankA2A

        routing = getattr(self.setup, "routing", None)
        if routing is None:
            return
        a2a = OPS.index("all_to_all")
        ranks = {}
        for x in recs:
            m = x.coll_op == a2a
            if m.any():
                ranks[x.rank] = RankA2A(x.stage, x.coll_layer[m], x.coll_bytes[m],
                                        self._to_target(x.coll_entry_s[m]),
                                        self._to_target(x.coll_exit_s[m]))
        if ranks:
            records = self.__dict__.setdefault("moe_records", MoeRecords())
            records.add_step(replica=plan.replica, step=plan.step,
                             micro_batch=plan.micro_batch, num_tokens=plan.num_tokens,
                             routing=routing, ep_groups=self.setup.layout.groups("ep"),
                             ranks=ranks)

    # ---- results ------------------------------------------------------------------------
    def tables(self) -> RunTables:
        """The run's tables so far (complete after run() returns)."""
        extra = run_extra(self.setup, self.requests)
        st = self.stats
        wall_s = st.wall_s or (time.monotonic() - self.t0 if self.t0 else 0.0)
        extra["control"] = {"wall_s": wall_s, "num_steps": st.num_steps,
                            "driver_busy_s": st.schedule_s, "idle_s": st.idle_s,
                            "checkpoint_s": st.checkpoint_s,
                            "num_checkpoints": st.num_checkpoints,
                            "driver_realtime": self.group.driver_realtime}
        extra["host_mode"] = self.host_mode
        moe = self.__dict__.get("moe_records")
        return RunTables(requests=request_table(self.requests).to_table(),
                         steps=self.steps.to_table(), collectives=self.collectives.finalize(),
                         extra=extra, moe=moe.to_table() if moe is not None else None)


def emulate(setup: RunSetup, *, on_progress: Callable[[int], None] | None = None,
            on_partial: Callable[[RunTables, BaseException], None] | None = None,
            on_checkpoint: Callable[[RunTables], None] | None = None,
            checkpoint_interval_s: float = 30.0, include_dashboard: bool = False) -> RunTables:
    """Run ``setup`` on Ray workers (an embedded local Ray unless config.address is set).

    ``on_checkpoint(tables_so_far)`` is called every ``checkpoint_interval_s`` while the run
    lasts; on any failure (including Ctrl-C, and failures to join Ray or place the ranks)
    ``on_partial(tables_so_far, error)`` is called before the error propagates and before
    the workers are torn down, so the caller can write the finished work. Every table's
    ``extra["nodes"]`` holds ``WorkerGroup.nodes_summary()`` once the workers are up."""
    from emulator.runtime.ray_setup import start_ray

    cfg = setup.config
    emu: Emulation | None = None
    nodes: dict | None = None

    def tables() -> RunTables:
        out = emu.tables() if emu is not None else _empty_tables(setup)
        out.extra["nodes"] = nodes
        return out

    def checkpoint(_tables: RunTables) -> None:
        _tables.extra["nodes"] = nodes
        on_checkpoint(_tables)

    try:
        with start_ray(cfg.address, include_dashboard=include_dashboard):
            with WorkerGroup(setup.layout, backend=cfg.backend,
                             timeout_s=cfg.timeout_s) as group:
                nodes = group.nodes_summary()
                emu = Emulation(setup, group)
                try:
                    emu.allocate()
                    emu.run(on_progress, checkpoint_interval_s=checkpoint_interval_s,
                            on_checkpoint=None if on_checkpoint is None else checkpoint)
                except BaseException as exc:
                    if on_partial is not None:
                        on_partial(tables(), exc)
                        on_partial = None  # written; the outer handler must not repeat it
                    raise
                return tables()
    except BaseException as exc:
        if on_partial is not None:
            on_partial(tables(), exc)
        raise


def _empty_tables(setup: RunSetup) -> RunTables:
    """The tables of a run that never started a step (every request unfinished)."""
    requests = setup.new_requests()
    return RunTables(requests=request_table(requests).to_table(),
                     steps=StepRecords().to_table(), collectives=None,
                     extra=run_extra(setup, requests))
