"""The driver's handle on all ranks: create the Worker actors, join their process groups,
run a DP replica's step with one Ray round trip, and turn failures into RunError.

Failure handling: every collective has the process-group timeout ``timeout_s``, so a rank
waiting for a peer that never comes raises within it. The driver fails a step as soon as
one of its ranks reports an error (it does not wait for the others), asks every rank of
the replica for its collective state (records.CollectiveState) and names the rank(s) that
did not enter the first collective on which the ranks diverged (diagnose.py), instead of
hanging. A dead actor is reported with its rank and node. A step whose ranks neither
finish nor fail is declared hung at its deadline (PendingStep.deadline_s).

Hosts and clocks: ranks whose nodes share one IP share one host; when all ranks do, gloo
uses the loopback interface and a 127.0.0.1 rendezvous. Worker records are stamped on the
driver's clock: a node on the driver's host shares its CLOCK_MONOTONIC (offset exactly 0);
every other host's offset is estimated once at start-up by ping-pong with its first rank
(measure_clock_offset) and applied by its workers. ``nodes_summary()`` reports both.
"""

from __future__ import annotations

import pickle
import time
from dataclasses import dataclass, field

import numpy as np
import ray
from ray.exceptions import (GetTimeoutError, OutOfMemoryError, RayActorError, RayError,
                            RayTaskError)

from emulator.core.work import StepWork
from emulator.errors import RunError
from emulator.runtime.awake import (DRIVER_RT_PRIORITY, DriverPriority, HostMode,
                                    realtime_allowed, wants_driver_realtime)
from emulator.runtime.diagnose import describe_stuck
from emulator.runtime.groups import stage_ranks, world_size_of
from emulator.runtime.ray_setup import LOCAL_HOST, LayoutLike, Placement, alive_nodes, placement
from emulator.runtime.records import CollectiveState, StepRecords
from emulator.runtime.worker import AllocationReport, Worker

CONTROL_TIMEOUT_S = 10.0
"""Bound on control calls (ping, state queries) that should answer in milliseconds."""
NUM_CLOCK_SAMPLES = 16
TEARDOWN_WAIT_S = 5.0
"""How long teardown lets ranks destroy their process groups before killing them."""
FAILURE_GRACE_S = 0.5
"""How long a step failure waits for the step's other ranks to finish (or fail) before
describing them."""


@dataclass(slots=True)
class PendingStep:
    """A replica step submitted to its ranks; pass it to WorkerGroup.collect()."""

    replica: int
    step_key: object
    ranks: list[int]
    refs: list[ray.ObjectRef]
    deadline_s: float
    """Driver monotonic time after which the step is declared hung."""
    results: list = field(default_factory=list)
    """Per ref: the rank's StepRecords once fetched, else None (see WorkerGroup.poll)."""

    def __post_init__(self) -> None:
        if not self.results:
            self.results = [None] * len(self.refs)

    @property
    def waiting(self) -> list[ray.ObjectRef]:
        """Refs of ranks that have not reported yet."""
        return [ref for ref, res in zip(self.refs, self.results) if res is None]

    @property
    def done(self) -> bool:
        return all(res is not None for res in self.results)


class WorkerGroup:
    """All Worker actors of one layout. Use as a context manager (teardown in finally)."""

    def __init__(self, layout: LayoutLike, *, backend: str = "auto", timeout_s: float = 60.0,
                 use_placement_groups: bool = True, cpus_per_rank: float = 0.01,
                 placement_timeout_s: float = 30.0, socket_ifname: str | None = None) -> None:
        self.layout = layout
        self.timeout_s = timeout_s
        self.world_size = world_size_of(layout)
        if backend == "auto":
            backend = "nccl" if ray.cluster_resources().get("GPU", 0) > 0 else "gloo"
        self.backend = backend
        self._placement: Placement | None = None
        self.actors: list[ray.actor.ActorHandle] = []
        self.clock_offset_s: dict[str, float] = {}
        """node id -> offset applied to its workers' records (driver = worker + offset)."""
        self._clock_detail: dict[str, dict] = {}
        self._node_ids: list[str] = []
        self._node_ips: list[str] = []
        self._replica_free_s: dict[int, float] = {}
        """replica -> driver time by which its in-flight steps' compute should be done."""
        self._open: list[PendingStep] = []
        """Submitted steps not yet fully collected (their errors are drained at the end)."""
        self.driver_realtime = False
        """Whether this group holds the driver at real-time priority (set_host_mode)."""
        try:
            self._start(use_placement_groups, cpus_per_rank, placement_timeout_s,
                        socket_ifname)
        except BaseException:
            self.teardown()
            raise

    def _start(self, use_placement_groups: bool, cpus_per_rank: float,
               placement_timeout_s: float, socket_ifname: str | None) -> None:
        gpus = 1.0 if self.backend == "nccl" else 0.0
        if use_placement_groups:
            self._placement = placement(self.layout, cpus_per_rank=cpus_per_rank,
                                        gpus_per_rank=gpus, timeout_s=placement_timeout_s)
            hosts = {self._placement.node_of_rank(r).ip for r in range(self.world_size)}
        else:
            hosts = {n.ip for n in alive_nodes()}
        if socket_ifname is None and len(hosts) == 1:
            # One host (possibly several Ray nodes on it): gloo must not pick an external
            # interface, and loopback reaches every rank.
            socket_ifname = "lo"
        env = {"GLOO_SOCKET_IFNAME": socket_ifname} if socket_ifname else {}
        for rank in range(self.world_size):
            # No task events: a run submits tens of steps a second for hours, and Ray would
            # keep an event per call (in the driver's buffer and up to 100k in the GCS)
            # for a dashboard this tool does not start by default.
            options: dict = {"num_cpus": cpus_per_rank, "num_gpus": gpus,
                             "enable_task_events": False}
            if self._placement is not None:
                options["scheduling_strategy"] = self._placement.scheduling_strategy(rank)
            self.actors.append(Worker.options(**options).remote(
                rank, self.layout, self.backend, self.timeout_s, env))
        infos = self._get([a.node_info.remote() for a in self.actors], CONTROL_TIMEOUT_S * 3,
                          "start the workers")
        self._node_ids = [node_id for node_id, _ in infos]
        self._node_ips = [ip for _, ip in infos]
        master_addr = LOCAL_HOST if len(set(self._node_ips)) == 1 else self._node_ips[0]
        master_port = self._get(self.actors[0].free_port.remote(), CONTROL_TIMEOUT_S,
                                "pick a rendezvous port")
        # All ranks at once: each blocks in the rendezvous until every rank has joined.
        self._get([a.init_process_groups.remote(master_addr, master_port, self.world_size)
                   for a in self.actors], self.timeout_s + CONTROL_TIMEOUT_S,
                  "initialise the process groups")
        self._estimate_clock_offsets()

    # -- helpers --------------------------------------------------------------------------
    def _where(self, rank: int) -> str:
        if not getattr(self, "_node_ips", None):
            return f"rank {rank}"
        return f"rank {rank} (node {self._node_ips[rank]} {self._node_ids[rank][:8]})"

    def get(self, refs, timeout_s: float, what: str):
        """ray.get with a bound: a timeout, a dead worker or a task error becomes a RunError
        saying what could not be done (and naming dead ranks)."""
        return self._get(refs, timeout_s, what)

    def _get(self, refs, timeout_s: float, what: str):
        single = not isinstance(refs, list)
        ref_list = [refs] if single else refs
        try:
            values = ray.get(ref_list, timeout=timeout_s)
        except GetTimeoutError:
            raise RunError(f"could not {what} within {timeout_s:.0f} s") from None
        except RayActorError as exc:
            raise RunError(f"a worker died while trying to {what}: "
                           f"{self._dead_ranks_text() or exc}") from None
        except (RayTaskError, RayError) as exc:  # e.g. OutOfMemoryError: a worker was killed
            raise RunError(f"could not {what}: {_first_line(exc)}") from None
        return values[0] if single else values

    def _dead_ranks_text(self) -> str:
        dead = []
        for rank, actor in enumerate(self.actors):
            try:
                ray.get(actor.ping.remote(), timeout=CONTROL_TIMEOUT_S)
            except (RayActorError, GetTimeoutError):
                dead.append(self._where(rank))
        return ", ".join(dead)

    def node_of_rank(self) -> list[str]:
        """Ray node id of every rank, by rank."""
        return list(self._node_ids)

    def node_ip_of_rank(self) -> list[str]:
        return list(self._node_ips)

    def _estimate_clock_offsets(self) -> None:
        """Offset per node such that driver_time = worker_monotonic + offset. Every node is
        measured by ping-pong with its first rank (measure_clock_offset). Nodes on the
        driver's host (same IP) share its CLOCK_MONOTONIC, so the offset applied is exactly
        0 and the measurement is only recorded; the nodes of any other host share the
        measurement with the smallest round trip among them (one kernel clock per host)."""
        driver_ip = ray.util.get_node_ip_address()
        for node in dict.fromkeys(self._node_ids):
            ranks = [r for r, n in enumerate(self._node_ids) if n == node]
            measured_s, round_trip_s = self.measure_clock_offset(ranks[0])
            self._clock_detail[node] = {
                "node_id": node, "node_ip": self._node_ips[ranks[0]], "ranks": ranks,
                "offset_s": 0.0, "measured_offset_s": measured_s,
                "round_trip_s": round_trip_s, "source": "same host as driver"}
        for ip in dict.fromkeys(self._node_ips):
            details = [d for d in self._clock_detail.values() if d["node_ip"] == ip]
            best = min(details, key=lambda d: d["round_trip_s"])
            for d in details:
                if ip != driver_ip:
                    d["offset_s"] = best["measured_offset_s"]
                    d["source"] = f"ping-pong via rank {best['ranks'][0]}"
                self.clock_offset_s[d["node_id"]] = d["offset_s"]
                self._get([self.actors[r].set_clock_offset.remote(d["offset_s"])
                           for r in d["ranks"]], CONTROL_TIMEOUT_S, "set clock offsets")

    def nodes_summary(self) -> dict:
        """Where every rank ran and the clock offsets applied to its records (for
        summary.json ``nodes``)."""
        return {"rank_node_ip": list(self._node_ips), "rank_node_id": list(self._node_ids),
                "driver_node_ip": ray.util.get_node_ip_address(),
                "clocks": [dict(d) for d in self._clock_detail.values()]}

    def measure_clock_offset(self, rank: int,
                             num_samples: int = NUM_CLOCK_SAMPLES) -> tuple[float, float]:
        """(offset_s, round_trip_s) between the driver's monotonic clock and ``rank``'s, by
        ping-pong: of ``num_samples`` exchanges keep the one with the smallest round trip
        and take its midpoint (as NTP does); the error is at most round_trip_s / 2."""
        best_rtt_s, offset_s = float("inf"), 0.0
        for _ in range(num_samples):
            t0 = time.monotonic_ns() * 1e-9
            worker_s = self._get(self.actors[rank].clock.remote(), CONTROL_TIMEOUT_S,
                                 "read a worker clock")
            t1 = time.monotonic_ns() * 1e-9
            if t1 - t0 < best_rtt_s:
                best_rtt_s, offset_s = t1 - t0, (t0 + t1) / 2 - worker_s
        return offset_s, best_rtt_s

    # -- host mode ----------------------------------------------------------------------
    def set_host_mode(self, mode: HostMode = HostMode()) -> list[dict]:
        """How every rank waits (Worker.set_host_mode): delays spun or slept, the node's
        idle-priority spinners (one per CPU, shared out among the ranks on each node), and
        the ranks' CPU priority; and the driver's priority while the group lives
        (awake.wants_driver_realtime: by default real-time when a rank on its host is;
        ``driver_realtime``)."""
        nodes = self.node_of_rank()
        reports = self.get([a.set_host_mode.remote(mode, nodes[:r].count(nodes[r]),
                                                   nodes.count(nodes[r]))
                            for r, a in enumerate(self.actors)],
                           self.timeout_s, "set the host mode")
        driver_ip = ray.util.get_node_ip_address()
        here = any(rep["realtime"] for ip, rep in zip(self._node_ips, reports)
                   if ip == driver_ip)
        allowed = (mode.driver_priority != "normal"
                   and realtime_allowed(DRIVER_RT_PRIORITY))
        want = wants_driver_realtime(mode.driver_priority, here, allowed)
        if want != self.driver_realtime:
            (DriverPriority.hold if want else DriverPriority.release)()
            self.driver_realtime = want
        return reports

    # -- memory ---------------------------------------------------------------------------
    def allocate(self, weight_shapes: list[tuple[int, ...]], kv_num_blocks: int,
                 kv_block_elems: int, memory_scale: float, *,
                 kv_block_size_tokens: int = 16,
                 stage_weight_shapes: list[list[tuple[int, ...]]] | None = None
                 ) -> list[AllocationReport]:
        """Allocate weight shards and the KV pool on every rank; reports by rank.

        Every rank holds ``weight_shapes``, or, if ``stage_weight_shapes`` is given, the
        shapes of its pipeline stage (``stage_weight_shapes[stage]``)."""
        refs = []
        for rank, actor in enumerate(self.actors):
            shapes = weight_shapes
            if stage_weight_shapes is not None:
                shapes = stage_weight_shapes[self.layout.rank_coords(rank)[1]]
            refs.append(actor.allocate.remote(shapes, kv_num_blocks, kv_block_elems,
                                              memory_scale,
                                              kv_block_size_tokens=kv_block_size_tokens))
        return self._get(refs, self.timeout_s, "allocate memory")

    def kv_rows_in_use(self, ranks: list[int] | None = None) -> list[int]:
        ranks = list(range(self.world_size)) if ranks is None else ranks
        return self._get([self.actors[r].kv_rows_in_use.remote() for r in ranks],
                         CONTROL_TIMEOUT_S, "read KV usage")

    def free_kv_blocks(self, replica: int, block_ids: np.ndarray,
                       kv_block_size_tokens: int = 16) -> None:
        """Tell every rank of ``replica`` that these KV blocks were freed, so that
        kv_rows_in_use() counts only rows of live blocks."""
        ranks = [r for stage in stage_ranks(self.layout, replica) for r in stage]
        self._get([self.actors[r].free_kv_blocks.remote(block_ids, kv_block_size_tokens)
                   for r in ranks], CONTROL_TIMEOUT_S, "free KV blocks")

    # -- steps ----------------------------------------------------------------------------
    def submit_replica_step(self, replica: int, step_work: StepWork,
                            slot_ids: np.ndarray | None, dilation: float,
                            step_key: object = None,
                            freed_blocks: tuple[np.ndarray, int] | None = None) -> PendingStep:
        """Start one plan on every rank of DP replica ``replica`` (stage s ranks run
        ``step_work.stages[s]``); returns at once. ``freed_blocks``: (block ids,
        kv_block_size_tokens) the KV manager freed since the replica's previous plan; every
        rank releases them (as :meth:`free_kv_blocks`) before it runs the plan."""
        stages = stage_ranks(self.layout, replica)
        if len(step_work.stages) != len(stages):
            raise ValueError(f"StepWork has {len(step_work.stages)} stages, layout has "
                             f"pp={len(stages)}")
        key = (replica, step_key)
        ranks, refs = [], []
        for s, stage_rank_list in enumerate(stages):
            recv_bytes = step_work.stages[s - 1].pp_send_bytes if s > 0 else 0
            # One pickle per stage, shared by its ranks (Worker.run_step_packed): Ray's
            # per-argument serialization costs more than the whole payload.
            payload = pickle.dumps((key, step_work.stages[s], slot_ids, dilation,
                                    step_work.num_tokens, step_work.num_sampled_tokens,
                                    recv_bytes, freed_blocks),
                                   protocol=pickle.HIGHEST_PROTOCOL)
            for rank in stage_rank_list:
                ranks.append(rank)
                refs.append(self.actors[rank].run_step_packed.remote(payload))
        # Worst case: the step queues behind this replica's steps already in flight (each
        # actor runs its steps in submission order), its stages run one after another, and
        # a rank waits timeout_s in a collective before raising.
        compute_s = sum(w.compute_s for w in step_work.stages) * dilation
        start_s = max(time.monotonic(), self._replica_free_s.get(replica, 0.0))
        self._replica_free_s[replica] = start_s + compute_s
        deadline_s = start_s + compute_s + 2 * self.timeout_s + CONTROL_TIMEOUT_S
        pending = PendingStep(replica, key, ranks, refs, deadline_s)
        self._open = [p for p in self._open if not p.done] + [pending]
        return pending

    def poll(self, pending: PendingStep, ready: set) -> bool:
        """Fetch the records of ``pending``'s ranks whose refs are in ``ready`` (refs that
        ray.wait returned); True once every rank has reported. Raises RunError at once if
        a rank failed or died, without waiting for the others."""
        idx = [i for i, ref in enumerate(pending.refs)
               if pending.results[i] is None and ref in ready]
        if idx:
            try:
                values = ray.get([pending.refs[i] for i in idx], timeout=CONTROL_TIMEOUT_S)
            except (RayError, GetTimeoutError) as exc:
                why = ("killed by Ray's memory monitor: the node ran out of memory"
                       if isinstance(exc, OutOfMemoryError) else "")
                raise self._step_failure(pending, why) from None
            for i, value in zip(idx, values):
                pending.results[i] = StepRecords.unpack(value)  # Worker.run_step_packed
        return pending.done

    def collect(self, pending: PendingStep) -> list[StepRecords]:
        """Wait for a submitted step; records in the order of ``pending.ranks`` (stage by
        stage, TP index within). Raises RunError on a dead rank or a hung collective, as
        soon as one rank fails or at the step's deadline."""
        while not pending.done:
            timeout_s = pending.deadline_s - time.monotonic()
            if timeout_s <= 0:
                raise self._step_failure(pending)
            ready, _ = ray.wait(pending.waiting, num_returns=1, timeout=timeout_s)
            self.poll(pending, set(ready))
        return list(pending.results)

    def fail(self, pending: PendingStep) -> RunError:
        """The RunError describing why ``pending`` did not finish (for a caller that gave
        up on it, e.g. past its deadline)."""
        return self._step_failure(pending)

    def run_replica_step(self, replica: int, step_work: StepWork,
                         slot_ids: np.ndarray | None, dilation: float,
                         step_key: object = None) -> list[StepRecords]:
        return self.collect(self.submit_replica_step(replica, step_work, slot_ids, dilation,
                                                     step_key))

    def _step_failure(self, pending: PendingStep, why_dead: str = "") -> RunError:
        key = pending.step_key[1]
        step = (f"step {key[0]} (micro-batch {key[1]})"
                if isinstance(key, tuple) and len(key) == 2 else f"step {key!r}")
        prefix = f"replica {pending.replica} {step}"
        # The first failure is reported at once, but ranks that fail the same way a moment
        # later belong in the report: give them a short grace (a rank stuck in a collective
        # is not waited for beyond it).
        ray.wait(pending.refs, num_returns=len(pending.refs), timeout=FAILURE_GRACE_S)
        _drain(pending.refs)
        dead, states = [], {}
        for rank in pending.ranks:
            try:
                states[rank] = ray.get(
                    self.actors[rank].collective_state.remote(pending.step_key),
                    timeout=CONTROL_TIMEOUT_S)
            except RayActorError:
                dead.append(self._where(rank))
            except GetTimeoutError:
                dead.append(self._where(rank) + " (not responding)")
        if dead:
            why_dead = why_dead or "its process exited or its node failed"
            return RunError(f"{prefix}: worker {', '.join(dead)} died ({why_dead})")
        stuck = describe_stuck(states, self.layout, pending.replica, pending.step_key,
                               self._where)
        return RunError(f"{prefix}: {stuck}; collective timeout {self.timeout_s:g} s")

    def skip_next_collective(self, rank: int) -> None:
        """Fault injection for tests: ``rank`` skips the next collective of the steps
        submitted after this call (it waits for the steps already queued on the rank)."""
        self._get(self.actors[rank].skip_next_collective.remote(), CONTROL_TIMEOUT_S,
                  "arm the fault hook")

    def collective_states(self) -> list[CollectiveState]:
        return self._get([a.collective_state.remote() for a in self.actors],
                         CONTROL_TIMEOUT_S, "read collective states")

    # -- teardown -------------------------------------------------------------------------
    def teardown(self) -> None:
        """Destroy process groups (best effort), kill the actors, release the placement
        and the driver's real-time priority."""
        if self.driver_realtime:
            DriverPriority.release()
            self.driver_realtime = False
        if self.actors:
            refs = [a.teardown.remote() for a in self.actors]
            ray.wait(refs, num_returns=len(refs), timeout=TEARDOWN_WAIT_S)
            for pending in self._open:  # teardown ran after them: they have ended
                _drain(pending.refs)
            self._open = []
            for actor in self.actors:
                ray.kill(actor)
            self.actors = []
        if self._placement is not None:
            self._placement.remove()
            self._placement = None

    def __enter__(self) -> WorkerGroup:
        return self

    def __exit__(self, *exc_info) -> None:
        self.teardown()


def _drain(refs: list[ray.ObjectRef]) -> None:
    """Retrieve the errors of finished refs, so that Ray does not log each unretrieved
    error with a traceback after the run already reported the failure in one line."""
    for ref in ray.wait(refs, num_returns=len(refs), timeout=0)[0]:
        try:
            ray.get(ref, timeout=0)
        except Exception:  # noqa: BLE001 - the failure is already being reported
            pass


def _first_line(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return text[0] if text else type(cause).__name__
