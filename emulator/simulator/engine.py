"""Discrete-event simulator: a heapq event loop with a virtual clock driving one scheduler
per DP replica through the cost model.

Events are (time, seq, kind, replica, payload); arrivals are merged from the sorted trace
without going through the heap. Each replica has a pipeline of ``pp`` stages; a plan enters
stage 0 when it is free, stage s when stage s-1 has finished it (plus the activation
transfer) and stage s is free, so with PP several micro-batches are in flight and stages
idle when the scheduler cannot form enough of them (bubbles).

Steady decode is fast-forwarded when pp == 1: when the scheduler guarantees that the next k
plans are "every running request decodes one token" (no admission, preemption or
completion before the last), the k step times are priced in one vectorized call and the
state is advanced at the end of the run in one call. The result is the same as stepping
(the scheduler's own tests check the state equivalence), at a fraction of the cost. A run is
cut at the next arrival when the replica's waiting queue is empty, so the arrival is
admitted at the step boundary right after it, as when stepping. The run's state is applied
when it starts (the replica stays busy until its end); requests of the run finish only at
its last step, so a router reading replica state during the run sees the same outstanding
counts as when stepping (KV usage is already the run's peak).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from emulator.core.plan import BatchPlan, StepResult
from emulator.core.requests import RequestTable
from emulator.core.router import Router
from emulator.core.scheduler import Scheduler
from emulator.cost import CostModel
from emulator.metrics.records import StepRecords
from emulator.metrics.schema import STEP_COLUMNS

_DONE, _RUN_DONE, _TRY = 0, 1, 2
MAX_RUN_STEPS = 4096  # longest fast-forwarded decode run (bounds the per-run arrays)


class _StepBuffer:
    """Step rows gathered during a run and handed to :class:`StepRecords` in one ``extend``
    at the end, in the order they were produced: single rows as tuples (STEP_COLUMNS order),
    fast-forwarded runs as a few arrays. ``StepRecords.extend`` validates every call (~0.1
    ms), which per run would cost more than pricing the run."""

    __slots__ = ("rows", "run_at", "run_meta", "run_end", "run_compute", "run_comm", "run_used")

    def __init__(self) -> None:
        self.rows: list[tuple] = []
        self.run_at: list[int] = []  # single rows produced before each run
        self.run_meta: list[tuple[int, int, int, int, int]] = []  # replica, step0, R, total, k
        self.run_end: list[np.ndarray] = []
        self.run_compute: list[np.ndarray] = []
        self.run_comm: list[np.ndarray] = []
        self.run_used: list[np.ndarray] = []

    def add_run(self, replica: int, first_step: int, num_requests: int, kv_blocks_total: int,
                end_s: np.ndarray, compute_s: np.ndarray, comm_s: np.ndarray,
                kv_blocks_used: np.ndarray) -> None:
        self.run_at.append(len(self.rows))
        self.run_meta.append((replica, first_step, num_requests, kv_blocks_total, end_s.size))
        self.run_end.append(end_s)
        self.run_compute.append(compute_s)
        self.run_comm.append(comm_s)
        self.run_used.append(kv_blocks_used)

    def flush_into(self, steps: StepRecords) -> None:
        if not self.rows and not self.run_at:
            return
        names = [c[0] for c in STEP_COLUMNS]
        single = ({n: np.array(col, dtype=c[2]) for n, c, col in zip(names, STEP_COLUMNS, zip(*self.rows))}
                  if self.rows else {n: np.empty(0, c[2]) for n, c in zip(names, STEP_COLUMNS)})
        num_single = len(self.rows)
        if not self.run_at:
            steps.extend(**single)
            self.__init__()
            return
        replica, step0, num_req, total, k = (np.array(c, np.int64) for c in zip(*self.run_meta))
        num_run = int(k.sum())
        n = num_single + num_run
        # Row position of each run's first step: single rows before it plus earlier runs.
        run_start = np.array(self.run_at, np.int64) + np.cumsum(k) - k
        is_run = np.zeros(n, bool)
        offset = np.arange(num_run) - np.repeat(np.cumsum(k) - k, k)  # step within its run
        is_run[np.repeat(run_start, k) + offset] = True
        end = np.concatenate(self.run_end)
        compute = np.concatenate(self.run_compute)
        comm = np.concatenate(self.run_comm)
        R = np.repeat(num_req, k)
        run_cols = {
            "replica": np.repeat(replica, k), "step": np.repeat(step0, k) + offset,
            "stage": 0, "start_s": end - (compute + comm), "end_s": end, "num_requests": R,
            "num_prefill_tokens": 0, "num_decode_tokens": R, "compute_s": compute,
            "comm_s": comm, "kv_blocks_used": np.concatenate(self.run_used),
            "kv_blocks_total": np.repeat(total, k), "micro_batch": 0}
        cols = {}
        for name, c in zip(names, STEP_COLUMNS):
            out = np.empty(n, c[2])
            out[is_run] = run_cols[name]
            out[~is_run] = single[name]
            cols[name] = out
        steps.extend(**cols)
        self.__init__()


@dataclass(slots=True)
class _Replica:
    scheduler: Scheduler
    stage_free_s: np.ndarray  # float64 [pp]: when each stage finishes its current work
    free_slots: list[int]     # micro-batch slots with no plan in flight
    try_pending: bool = False


class CostModelExecutor:
    """Prices a plan with the cost model: the simulator's implementation of the Executor
    protocol. ``stage_free_s`` carries the pipeline state between plans of one replica.

    ``host`` (only ``emulator validate`` sets it, already scaled to target units) adds the
    emulator host's overheads so the simulator predicts an emulation on that host
    (comm.HostOverhead): before a plan, the driver's round trip since the previous plan of
    the replica ended; in every stage, the fixed per-step time, the write of the step's KV
    rows, the excess of each compute delay, the gap between delays that follow each other
    and, per group collective, the straggler wait (the step waits for the last rank).

    PP bubbles: a stage starts when its activations arrive, and a transfer starts when the
    sender is done and the receiving stage is free (and the plan submitted): a rendezvous,
    so stages idle when too few micro-batches are in flight and a sender whose successor is
    busy stays blocked in its send, as on the workers; with ``host``, the side that idled in
    the transfer pays the wake-up cost of that idle time.
    """

    def __init__(self, cost: CostModel, requests: RequestTable, host=None,
                 clock: Callable[[], float] | None = None) -> None:
        self.cost = cost
        self.requests = requests
        self.host = host
        self.clock = clock
        """When set (``lambda: sim.now_s``), the time the plan is formed: the host's round
        trip runs from then, and a plan formed while stage 0 is still busy waits for it."""

    def _host_terms(self, work, pp: int) -> tuple[float, np.ndarray]:
        """(gap before the plan, overhead per stage) of the emulator host, target seconds."""
        h = self.host
        tp = self.cost.tp
        over = np.empty(pp)
        num_rows = 0
        for p, st in enumerate(work.stages):
            delays = np.concatenate([st.attn_compute_s, st.mlp_compute_s,
                                     [st.pre_compute_s] if p == 0 else [],
                                     [st.post_compute_s] if p == pp - 1 else []])
            # A pipeline stage without TP: its own fixed time, by role (a receiving stage's
            # prologue runs while it waits for its activations).
            fixed = h.step_fixed_s
            if pp > 1 and tp == 1 and h.p2p_stage_fixed_s is not None:
                fixed = h.p2p_stage_fixed_s[0 if p == 0 else 1]
            # Every stage writes its KV rows once per step (the emulator records slots).
            over[p] = fixed + h.kv_write_s + float(h.delay_excess(delays).sum())
            num_group = 0
            if tp > 1:  # every delay is followed by a TP collective (worker.run_step)
                over[p] += float(h.collective_excess(delays).sum())
                num_group = delays.size
            if self.cost.ep > 1:  # EP dispatch + combine per MoE layer, right after another op
                num_a2a = 2 * self.cost._num_moe[p]
                over[p] += num_a2a * float(h.collective_excess(0.0))
                num_group += num_a2a
            if tp > 1 and st.probe_bytes:  # the thermometer, right after another op (the
                # middle layer's first all-reduce), with what its own probe measured beyond
                # the back-to-back calls' transfer
                mid = float(st.attn_compute_s[st.layer_ids.size // 2])
                over[p] += float(h.collective_excess(0.0) + h.thermometer_wake(mid)
                                 - h.wake(0.0))
                num_group += 1
            over[p] += num_group * h.collective_call_s
            # Delays that follow each other (no collective between): the layer loop's gap.
            over[p] += max(0, delays.size - 1 - num_group) * h.delay_gap_s
            num_rows += tp * (num_group + (p > 0) + (p < pp - 1))
        return h.step_gap_s + num_rows * h.step_gap_s_per_collective, over

    def execute(self, plan: BatchPlan, start_s: float,
                stage_free_s: np.ndarray | None = None) -> StepResult:
        req = self.requests
        idx = plan.request_index
        work = self.cost.step_work(plan, prompt_tokens=req.prompt_tokens[idx] + req.num_output_tokens[idx])
        compute, comm, p2p = self.cost.stage_times(work, plan.replica)
        pp = compute.size
        send_bytes = work.stages[0].pp_send_bytes if pp > 1 else 0
        gap, over = (0.0, np.zeros(pp)) if self.host is None else self._host_terms(work, pp)
        # A plan formed at `now` reaches the ranks one round trip later; if stage 0 is still
        # busy then, it waits in the actor's queue (the engine's start_s = max(now, free)).
        now_s = start_s if self.clock is None else min(start_s, self.clock())
        submitted = now_s + gap
        stage_start = np.empty(pp)
        stage_end = np.empty(pp)
        free = [submitted if stage_free_s is None else max(submitted, float(stage_free_s[s]))
                for s in range(pp)]
        begin = max(start_s, free[0])
        for s in range(pp):
            stage_start[s] = begin
            done = begin + compute[s] + comm[s] + over[s]
            if s == pp - 1:
                stage_end[s] = done
                break
            # Rendezvous: the transfer starts once the sender is done and the receiver has
            # posted its recv (it is free); both leave the op when it completes, so a sender
            # whose successor is still busy is blocked until then (gloo's send, and NCCL's,
            # wait for the matching recv).
            meet = max(done, free[s + 1])
            xfer = p2p
            if self.host is not None:
                # Waking the side that idled in the op costs what the probe measured.
                sender_waited = free[s + 1] > done
                xfer = max(0.0, xfer + float(self.host.p2p_wake(
                    meet - min(done, free[s + 1]), sender_waited, send_bytes)))
            stage_end[s] = begin = meet + xfer
        by_axis = {"tp": float(comm.sum())} if self.cost.tp > 1 else {}
        if pp > 1:
            by_axis["pp"] = p2p * (pp - 1)
        return StepResult(replica=plan.replica, step=plan.step, micro_batch=plan.micro_batch,
                          start_s=float(stage_start[0]), end_s=float(stage_end[-1]),
                          stage_start_s=stage_start, stage_end_s=stage_end,
                          compute_s=float(compute.sum()),
                          comm_s=float(comm.sum() + p2p * (pp - 1)), comm_by_axis_s=by_axis,
                          stage_compute_s=compute,
                          stage_comm_s=comm)


class Simulation:
    """One simulated run over a request table; call :meth:`run` once."""

    def __init__(self, requests: RequestTable, schedulers: list[Scheduler], router: Router,
                 cost: CostModel, *, fast_forward: bool = True) -> None:
        self.requests = requests
        self.router = router
        self.cost = cost
        self.executor = CostModelExecutor(cost, requests)
        pp = cost.pp
        self.replicas = [_Replica(s, np.zeros(pp), list(range(pp))) for s in schedulers]
        self.fast_forward = fast_forward and pp == 1
        self.steps = StepRecords()
        """Step rows; complete when :meth:`run` returns."""
        self._rows = _StepBuffer()
        self.now_s = 0.0
        self._heap: list[tuple] = []
        self._seq = 0
        order = np.argsort(requests.arrival_s, kind="stable")
        # Python lists: the loop reads one element per event, cheaper than numpy scalars.
        self._order = order.tolist()
        self._arrival_s = requests.arrival_s[order].tolist() + [math.inf]
        self._next_arrival = 0

    # ---- event plumbing -------------------------------------------------------------------
    @property
    def num_events(self) -> int:
        """Heap events so far plus the arrivals processed (merged from the trace without
        going through the heap); after :meth:`run`, every event of the run."""
        return self._seq + self._next_arrival

    def _push(self, time_s: float, kind: int, replica: int, payload=None) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (time_s, self._seq, kind, replica, payload))

    def _wake(self, r: int, time_s: float) -> None:
        rep = self.replicas[r]
        if not rep.try_pending and rep.free_slots:
            rep.try_pending = True
            self._push(time_s, _TRY, r)

    def _next_arrival_s(self) -> float:
        return self._arrival_s[self._next_arrival]

    # ---- main loop ------------------------------------------------------------------------
    def run(self, on_progress: Callable[[int], None] | None = None) -> None:
        """Run until every request has finished (or was rejected); ``on_progress(n)`` is
        called with the number of requests each completion finished."""
        while True:
            t_arr = self._arrival_s[self._next_arrival]
            t_evt = self._heap[0][0] if self._heap else math.inf
            if t_arr == math.inf and t_evt == math.inf:
                break
            if t_arr <= t_evt:  # an arrival at a step boundary joins the next step
                idx = self._order[self._next_arrival]
                self._next_arrival += 1
                self.now_s = t_arr
                self._arrive(idx, t_arr)
                continue
            time_s, _, kind, r, payload = heapq.heappop(self._heap)
            self.now_s = time_s
            if kind == _TRY:
                self.replicas[r].try_pending = False
                self._try_schedule(r, time_s)
                continue
            if kind == _DONE:
                n = self._plan_done(r, payload, time_s)
            else:
                n = self._run_done(r, payload, time_s)
            if n and on_progress is not None:
                on_progress(n)
        self._rows.flush_into(self.steps)

    def _arrive(self, idx: int, now_s: float) -> None:
        scheds = [rep.scheduler for rep in self.replicas]
        r = self.router.route_to(idx, scheds)
        if scheds[r].add_request(idx, now_s):
            self._wake(r, now_s)

    def _try_schedule(self, r: int, now_s: float) -> None:
        rep = self.replicas[r]
        sched = rep.scheduler
        while rep.free_slots and sched.has_work:
            if self.fast_forward and self._start_decode_run(r, now_s):
                return
            slot = rep.free_slots[0]
            plan = sched.schedule(now_s, slot)
            if plan is None:
                return
            rep.free_slots.pop(0)
            start = max(now_s, float(rep.stage_free_s[0]))
            result = self.executor.execute(plan, start, rep.stage_free_s)
            rep.stage_free_s[:] = result.stage_end_s
            # KV in use while the plan runs: after forming it, before anything it finishes is
            # freed (the same definition as a fast-forwarded run's rows).
            self._push(result.end_s, _DONE, r, (plan, result, sched.kv_blocks_used))

    def _start_decode_run(self, r: int, now_s: float) -> bool:
        sched = self.replicas[r].scheduler
        k = sched.steady_decode_horizon(MAX_RUN_STEPS)
        if k < 2:
            return False
        compute, comm, _ = self.cost.decode_run_stage_times(sched.decode_contexts(), k, r)
        compute, comm = compute[:, 0], comm[:, 0]  # pp == 1
        ends = now_s + np.cumsum(compute + comm)
        if sched.num_waiting == 0:
            # Stop after the step during which the next request arrives.
            k = min(k, int(np.searchsorted(ends, self._next_arrival_s(), side="left")) + 1)
            if k < 2:
                return False
        # Apply the run now (the scheduler checks k against its horizon, which arrivals
        # during the run could change); the replica stays busy until the run's end event.
        num_req, first_step = sched.num_running, sched.num_steps
        used = sched.decode_run_kv_blocks_used(k)
        ends = ends[:k]
        finished = sched.advance_decode_run(k, ends)
        self._rows.add_run(r, first_step, num_req, sched.kv_blocks_total, ends, compute[:k],
                           comm[:k], used)
        self.replicas[r].free_slots.pop(0)
        self._push(float(ends[-1]), _RUN_DONE, r, int(finished.size))
        return True

    # ---- completions ------------------------------------------------------------------------
    def _plan_done(self, r: int, payload: tuple[BatchPlan, StepResult], now_s: float) -> int:
        plan, result, used = payload
        rep = self.replicas[r]
        sched = rep.scheduler
        finished = sched.on_plan_done(plan, result.end_s)
        total = sched.kv_blocks_total
        rows = self._rows.rows
        for s in range(result.stage_end_s.size):
            rows.append((r, plan.step, s, float(result.stage_start_s[s]),
                         float(result.stage_end_s[s]), plan.num_requests,
                         plan.num_prefill_tokens, plan.num_decode_tokens,
                         float(result.stage_compute_s[s]), float(result.stage_comm_s[s]),
                         used, total, plan.micro_batch))
        rep.free_slots.append(plan.micro_batch)
        rep.free_slots.sort()
        self._wake(r, now_s)
        return int(finished.size)

    def _run_done(self, r: int, num_finished: int, now_s: float) -> int:
        self.replicas[r].free_slots.append(0)
        self._wake(r, now_s)
        return num_finished
