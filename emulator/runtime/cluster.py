"""The driver's handle on all ranks: create the Worker actors, join their process groups,
run a DP replica's step with one Ray round trip, and turn failures into RunError.

Failure handling: every collective has the process-group timeout ``timeout_s``, so a rank
waiting for a peer that never comes raises within it. The driver then asks every rank of
the replica for its collective state (records.CollectiveState) and names the rank(s) that
did not enter the first collective on which the ranks diverged (diagnose.py), instead of
hanging. A dead actor is reported with its rank and node.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from emulator.core.work import StepWork
from emulator.errors import RunError
from emulator.runtime.diagnose import describe_stuck
from emulator.runtime.groups import stage_ranks, world_size_of
from emulator.runtime.ray_setup import LOCAL_HOST, LayoutLike, Placement, placement
from emulator.runtime.records import CollectiveState, StepRecords
from emulator.runtime.worker import AllocationReport, Worker

CONTROL_TIMEOUT_S = 10.0
"""Bound on control calls (ping, state queries) that should answer in milliseconds."""
NUM_CLOCK_SAMPLES = 16
TEARDOWN_WAIT_S = 5.0
"""How long teardown lets ranks destroy their process groups before killing them."""


@dataclass(slots=True)
class PendingStep:
    """A replica step submitted to its ranks; pass it to WorkerGroup.collect()."""

    replica: int
    step_key: object
    ranks: list[int]
    refs: list[ray.ObjectRef]
    deadline_s: float
    """Driver monotonic time after which the step is declared hung."""


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
        self._replica_free_s: dict[int, float] = {}
        """replica -> driver time by which its in-flight steps' compute should be done."""
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
        num_nodes = len([n for n in ray.nodes() if n.get("Alive")])
        if socket_ifname is None and num_nodes == 1:
            socket_ifname = "lo"  # one host: gloo must not pick an external interface
        env = {"GLOO_SOCKET_IFNAME": socket_ifname} if socket_ifname else {}
        for rank in range(self.world_size):
            options: dict = {"num_cpus": cpus_per_rank, "num_gpus": gpus}
            if self._placement is not None:
                options["scheduling_strategy"] = self._placement.scheduling_strategy(rank)
            self.actors.append(Worker.options(**options).remote(
                rank, self.layout, self.backend, self.timeout_s, env))
        infos = self._get([a.node_info.remote() for a in self.actors], CONTROL_TIMEOUT_S * 3,
                          "start the workers")
        self._node_ids = [node_id for node_id, _ in infos]
        self._node_ips = [ip for _, ip in infos]
        master_addr = LOCAL_HOST if len(set(self._node_ids)) == 1 else self._node_ips[0]
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
        except RayTaskError as exc:
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
        """Per node: offset such that driver_time = worker_monotonic + offset. The driver's
        own node shares CLOCK_MONOTONIC, so its offset is exactly 0; other nodes use
        measure_clock_offset on their first rank."""
        driver_node = ray.get_runtime_context().get_node_id()
        for node in dict.fromkeys(self._node_ids):
            ranks = [r for r, n in enumerate(self._node_ids) if n == node]
            offset_s = 0.0 if node == driver_node else self.measure_clock_offset(ranks[0])[0]
            self.clock_offset_s[node] = offset_s
            self._get([self.actors[r].set_clock_offset.remote(offset_s) for r in ranks],
                      CONTROL_TIMEOUT_S, "set clock offsets")

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
                            step_key: object = None) -> PendingStep:
        """Start one plan on every rank of DP replica ``replica`` (stage s ranks run
        ``step_work.stages[s]``); returns at once."""
        stages = stage_ranks(self.layout, replica)
        if len(step_work.stages) != len(stages):
            raise ValueError(f"StepWork has {len(step_work.stages)} stages, layout has "
                             f"pp={len(stages)}")
        key = (replica, step_key)
        ranks, refs = [], []
        for s, stage_rank_list in enumerate(stages):
            recv_bytes = step_work.stages[s - 1].pp_send_bytes if s > 0 else 0
            for rank in stage_rank_list:
                ranks.append(rank)
                refs.append(self.actors[rank].run_step.remote(
                    key, step_work.stages[s], slot_ids, dilation, step_work.num_tokens,
                    step_work.num_sampled_tokens, recv_bytes))
        # Worst case: the step queues behind this replica's steps already in flight (each
        # actor runs its steps in submission order), its stages run one after another, and
        # a rank waits timeout_s in a collective before raising.
        compute_s = sum(w.compute_s for w in step_work.stages) * dilation
        start_s = max(time.monotonic(), self._replica_free_s.get(replica, 0.0))
        self._replica_free_s[replica] = start_s + compute_s
        deadline_s = start_s + compute_s + 2 * self.timeout_s + CONTROL_TIMEOUT_S
        return PendingStep(replica, key, ranks, refs, deadline_s)

    def collect(self, pending: PendingStep) -> list[StepRecords]:
        """Wait for a submitted step; records in the order of ``pending.ranks`` (stage by
        stage, TP index within). Raises RunError on a dead rank or a hung collective."""
        timeout_s = max(0.0, pending.deadline_s - time.monotonic())
        ready, _ = ray.wait(pending.refs, num_returns=len(pending.refs), timeout=timeout_s)
        if len(ready) == len(pending.refs):
            try:
                return ray.get(pending.refs)
            except (RayActorError, RayTaskError):
                pass
        raise self._step_failure(pending)

    def run_replica_step(self, replica: int, step_work: StepWork,
                         slot_ids: np.ndarray | None, dilation: float,
                         step_key: object = None) -> list[StepRecords]:
        return self.collect(self.submit_replica_step(replica, step_work, slot_ids, dilation,
                                                     step_key))

    def _step_failure(self, pending: PendingStep) -> RunError:
        prefix = f"replica {pending.replica} step {pending.step_key[1]!r}"
        dead, states = [], {}
        for rank in pending.ranks:
            try:
                states[rank] = ray.get(self.actors[rank].collective_state.remote(),
                                       timeout=CONTROL_TIMEOUT_S)
            except RayActorError:
                dead.append(self._where(rank))
            except GetTimeoutError:
                dead.append(self._where(rank) + " (not responding)")
        if dead:
            return RunError(f"{prefix}: worker {', '.join(dead)} died")
        stuck = describe_stuck(states, self.layout, pending.replica, pending.step_key,
                               self._where)
        return RunError(f"{prefix}: {stuck}; collective timeout {self.timeout_s:g} s")

    def skip_next_collective(self, rank: int) -> None:
        """Fault injection for tests: ``rank`` skips its next collective."""
        self._get(self.actors[rank].skip_next_collective.remote(), CONTROL_TIMEOUT_S,
                  "arm the fault hook")

    def collective_states(self) -> list[CollectiveState]:
        return self._get([a.collective_state.remote() for a in self.actors],
                         CONTROL_TIMEOUT_S, "read collective states")

    # -- teardown -------------------------------------------------------------------------
    def teardown(self) -> None:
        """Destroy process groups (best effort), kill the actors, release the placement."""
        if self.actors:
            refs = [a.teardown.remote() for a in self.actors]
            ray.wait(refs, num_returns=len(refs), timeout=TEARDOWN_WAIT_S)
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


def _first_line(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return text[0] if text else type(cause).__name__
