"""The Ray actor standing in for one GPU (one rank).

It holds real memory (weight shards and a paged KV pool, scaled by ``memory_scale``), sleeps
the cost model's compute delays and runs the real collectives of its pipeline stage
(DESIGN.md sections 3-5). The driver (cluster.WorkerGroup) calls it.

Threads: steps, allocation, teardown and the fault hook run in the default concurrency
group (one thread, in submission order); ``ping``, ``clock`` and ``collective_state`` run in
a separate "control" group so the driver can query a rank that is blocked in a collective.

One step on one rank (``run_step``), with ``d = dilation``:
  stage > 0: recv activations from the previous stage (same TP index)
  stage 0:   sleep pre_compute_s*d; all-reduce embed_allreduce_bytes over TP (if tp > 1)
  per layer: sleep attn_compute_s*d; [first layer: write this step's KV rows];
             all-reduce tp_allreduce_bytes [the stage's middle layer (index n // 2 of n):
             and work.probe_bytes right after, validate's thermometer]; sleep
             mlp_compute_s*d; all-reduce again
  EP layer:  (work.ep_layers) the MLP part becomes: route the step's tokens (core.routing,
             the same seeded gating everywhere); sleep (mlp - expert)*d for router and
             shared experts; all_to_all dispatch with the routing's uneven splits; sleep
             this rank's own expert time for the pairs it received; all_to_all combine
             (splits transposed). Imbalance thus becomes real waiting in the combine.
  last:      sleep post_compute_s*d; all-gather logits_gather_bytes per rank over TP
  otherwise: send pp_send_bytes of activations to the next stage
KV rows are written once per step, after the first layer's attention (one index_fill over
all of the step's slots): a pool row stands for one token's KV in *all* of this stage's
layers, so one write per step touches exactly the rows a real engine would fill.
A "sleep" above is timed from the end of the rank's previous op (the step's start, a
collective's exit, the KV write's end) and waited out by the op after it, so the rank's own
Python between ops runs inside the delay (groups.TimedCollectives.compute).
"""

from __future__ import annotations

import os
import pickle
import socket
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import torch
import torch.distributed as dist

from emulator.core.routing import route
from emulator.core.work import StageWork
from emulator.runtime.awake import (HostMode, IdleSpinners, cpus_available, decide,
                                    pin_threads, set_realtime, spinners_for)
from emulator.runtime.delay import SPIN_S, CudaStreamDelay, precise_sleep
from emulator.runtime.groups import TimedCollectives, init_process_groups, rank_topology
from emulator.runtime.ray_setup import LayoutLike
from emulator.runtime.records import (COMPUTE_KINDS, NO_LAYER, PROBE_LAYER, CollectiveState,
                                      StepRecords)
from emulator.runtime.shards import kv_row_elems

DTYPE = torch.bfloat16
DTYPE_BYTES = 2
EP_LOG_STEPS = 4096
"""All-to-all split records a rank keeps (EP layers x steps) for ep_splits()."""


@dataclass(slots=True)
class EpSplit:
    """One EP layer of one step on one rank: the split sizes it really passed to
    all_to_all_single, in rows (one row = one (token, expert) pair)."""

    step_key: object
    layer: int
    dispatch_send: list[int]
    """Rows sent to each EP group member in the dispatch (input_split_sizes)."""
    dispatch_recv: list[int]
    """Rows received from each member in the dispatch (output_split_sizes)."""
    dispatch_rows: tuple[int, int]
    """(input tensor rows, output tensor rows) of the dispatch."""
    combine_rows: tuple[int, int]
    """(input tensor rows, output tensor rows) of the combine."""
    expert_pairs: int
    """(token, expert) pairs this rank's experts computed; the expert delay scales with it."""


@dataclass(slots=True)
class AllocationReport:
    """Memory one rank really holds, and the target bytes it stands for."""

    rank: int
    weight_bytes_allocated: int
    weight_bytes_represented: int
    """sum over shards of numel x 2 bytes, before scaling."""
    kv_bytes_allocated: int
    kv_bytes_represented: int
    """kv_num_blocks x kv_block_elems x 2 bytes, before scaling."""
    kv_num_rows: int
    """Rows (slots) of the KV pool: kv_num_blocks x kv_block_size_tokens."""


TCP_CONGESTION = Path("/proc/sys/net/ipv4/tcp_congestion_control")


def host_tcp_congestion() -> str | None:
    """The congestion control new TCP sockets get on this host (Linux; None elsewhere).

    gloo's sockets get it when a group is created. A process can switch them afterwards,
    but not their pacing: an established BBR socket switched to cubic stayed paced, at
    cubic's default rate (cwnd x MSS / smoothed RTT), and a PP=2 run's pipeline transfers
    at dilation 50 took twice as long (docs/results-validation.md, repeat 18). Under BBR a
    socket's pace follows its own recent traffic, so a run records which one its transfers
    ran on."""
    try:
        return TCP_CONGESTION.read_text().strip() or None
    except OSError:
        return None


def _normal_priority() -> int:
    """Run this rank at normal CPU priority if allowed; return the niceness it runs at.

    Ray starts worker processes at nice 15 (RAY_worker_niceness), so on a busy host any
    other process preempts a rank that wakes from a compute delay, and a collective right
    after a delay waits milliseconds for the peer to be scheduled. Lowering the niceness needs
    CAP_SYS_NICE (root); without it the rank keeps Ray's value and the summary shows it."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 0)
    except (PermissionError, OSError):
        pass
    return os.getpriority(os.PRIO_PROCESS, 0)


@ray.remote(concurrency_groups={"control": 1})
class Worker:
    """One emulated GPU. ``layout`` is a ParallelLayout (see ray_setup.LayoutLike)."""

    def __init__(self, rank: int, layout: LayoutLike, backend: str = "gloo",
                 timeout_s: float = 60.0, env: dict[str, str] | None = None) -> None:
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
        os.environ.update(env or {})  # before torch.distributed reads GLOO_SOCKET_IFNAME
        self.niceness = _normal_priority()
        self.rank = rank
        self.layout = layout
        self.backend = backend
        self.timeout_s = timeout_s
        self.topology = rank_topology(layout, rank)
        self._clock_offset_s = 0.0
        if backend == "nccl":
            self._device = torch.device("cuda", 0)  # Ray exposes the assigned GPU as 0
            torch.cuda.set_device(self._device)
            cuda_delay = CudaStreamDelay()
            delay = lambda s: (cuda_delay.enqueue(s), torch.cuda.synchronize())  # noqa: E731
            self._synchronize = torch.cuda.synchronize
        else:
            self._device = torch.device("cpu")
            delay = precise_sleep
            self._synchronize = lambda: None
        self.spin_s = SPIN_S
        self.realtime = False
        self.cpu: int | None = None
        self._spinners = IdleSpinners()
        self._coll = TimedCollectives(rank, {}, self._device, self._now, self._synchronize,
                                      delay)
        self._groups: dict = {}
        self.tcp_congestion: str | None = None
        self._weights: list[torch.Tensor] = []
        self._kv_pool: torch.Tensor | None = None  # [rows, row_elems], a row = one slot
        self._kv_written = np.zeros(0, dtype=bool)
        self._num_kv_rows_in_use = 0
        self._num_steps = 0
        self._ep_log: deque[EpSplit] = deque(maxlen=EP_LOG_STEPS)

    def _now(self) -> float:
        return time.monotonic_ns() * 1e-9 + self._clock_offset_s

    # -- set-up ---------------------------------------------------------------------------
    @ray.method(concurrency_group="control")
    def node_info(self) -> tuple[str, str]:
        """(Ray node id, node IP) of this rank."""
        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()

    @ray.method(concurrency_group="control")
    def free_port(self) -> int:
        """A TCP port free on this node (rank 0 hosts the rendezvous)."""
        with socket.socket() as sock:
            sock.bind(("", 0))
            return sock.getsockname()[1]

    def init_process_groups(self, master_addr: str, master_port: int, world_size: int) -> None:
        if world_size != self.topology.world_size:
            raise ValueError(f"world_size {world_size} != layout's {self.topology.world_size}")
        self.tcp_congestion = host_tcp_congestion()  # what the groups' sockets get
        groups = init_process_groups(self.layout, self.rank, backend=self.backend,
                                     master_addr=master_addr, master_port=master_port,
                                     timeout_s=self.timeout_s)
        self._groups = groups
        self._coll = TimedCollectives(self.rank, groups, self._device, self._now,
                                      self._synchronize, self._coll.delay)

    def allocate(self, weight_shapes: list[tuple[int, ...]], kv_num_blocks: int,
                 kv_block_elems: int, memory_scale: float, *,
                 kv_block_size_tokens: int = 16) -> AllocationReport:
        """Hold the weight shards and the KV pool, element counts scaled by memory_scale.

        The pool is ``[kv_num_blocks * kv_block_size_tokens, row_elems]`` with
        ``row_elems = max(1, round(kv_block_elems * memory_scale / kv_block_size_tokens))``:
        the ``[kv_num_blocks, block_elems]`` pool with each block split into its token rows,
        so that slot ``block_id * block_size + offset`` is row ``slot``.
        """
        self._weights = []
        weight_alloc = weight_repr = 0
        for shape in weight_shapes:
            numel = int(np.prod(shape, dtype=np.int64))
            scaled = max(1, round(numel * memory_scale))
            # fill_ touches every page, so the memory is resident, not just reserved.
            self._weights.append(torch.empty(scaled, dtype=DTYPE, device=self._device).fill_(1))
            weight_alloc += scaled * DTYPE_BYTES
            weight_repr += numel * DTYPE_BYTES
        num_rows = kv_num_blocks * kv_block_size_tokens
        row_elems = kv_row_elems(kv_block_elems, memory_scale, kv_block_size_tokens)
        self._kv_pool = torch.zeros(num_rows, row_elems, dtype=DTYPE, device=self._device)
        self._kv_written = np.zeros(num_rows, dtype=bool)
        # Run the KV write path once on row 0 and undo it: its first call loads code
        # (numpy's set routines take ~7 ms), which would otherwise land in the first step.
        self._write_kv(np.zeros(1, dtype=np.int64))
        self._kv_pool[0].zero_()
        self._kv_written[0] = False
        self._num_kv_rows_in_use = 0
        return AllocationReport(
            rank=self.rank, weight_bytes_allocated=weight_alloc,
            weight_bytes_represented=weight_repr,
            kv_bytes_allocated=num_rows * row_elems * DTYPE_BYTES,
            kv_bytes_represented=kv_num_blocks * kv_block_elems * DTYPE_BYTES,
            kv_num_rows=num_rows)

    # -- KV pool --------------------------------------------------------------------------
    def _write_kv(self, slot_ids: np.ndarray) -> None:
        if self._kv_pool is None:
            raise RuntimeError(f"rank {self.rank}: run_step got slot_ids before allocate()")
        num_rows = self._kv_written.shape[0]
        if slot_ids.size and (slot_ids.min() < 0 or slot_ids.max() >= num_rows):
            raise ValueError(f"rank {self.rank}: slot ids must lie in [0, {num_rows}), got "
                             f"[{slot_ids.min()}, {slot_ids.max()}]")
        self._kv_pool.index_fill_(0, torch.from_numpy(slot_ids.astype(np.int64)),
                                  float(self._num_steps % 256))
        unique = np.unique(slot_ids)
        self._num_kv_rows_in_use += int((~self._kv_written[unique]).sum())
        self._kv_written[unique] = True

    def kv_rows_in_use(self) -> int:
        """Distinct KV pool rows (token slots) written since allocate() or reset, minus
        rows of blocks released with free_kv_blocks()."""
        return self._num_kv_rows_in_use

    def free_kv_blocks(self, block_ids: np.ndarray, kv_block_size_tokens: int = 16) -> None:
        """Mark the rows of these blocks unused (the block manager freed them)."""
        rows = (np.asarray(block_ids, dtype=np.int64)[:, None] * kv_block_size_tokens
                + np.arange(kv_block_size_tokens)).ravel()
        self._num_kv_rows_in_use -= int(self._kv_written[rows].sum())
        self._kv_written[rows] = False

    # -- one step -------------------------------------------------------------------------
    def _compute(self, kind: int, layer: int, seconds: float) -> None:
        # Deferred: waited out by the next op (TimedCollectives.compute).
        self._coll.compute(kind, layer, seconds)

    def _check_step(self, work: StageWork, slot_ids: np.ndarray | None, num_tokens: int,
                    recv_bytes: int) -> None:
        topo = self.topology
        if work.stage != topo.stage:
            raise ValueError(f"rank {self.rank} is on stage {topo.stage}, got work for "
                             f"stage {work.stage}")
        if slot_ids is not None and len(slot_ids) != num_tokens:
            raise ValueError(f"rank {self.rank}: {len(slot_ids)} slot ids for "
                             f"{num_tokens} tokens; one KV slot per computed token")
        if len(topo.tp_ranks) == 1 and (work.tp_allreduce_bytes or work.embed_allreduce_bytes
                                        or work.logits_gather_bytes or work.probe_bytes):
            raise ValueError(f"rank {self.rank}: StageWork has TP collective bytes but tp=1")
        if topo.prev_stage_rank is not None and recv_bytes <= 0:
            raise ValueError(f"rank {self.rank} (stage {topo.stage}) needs recv_bytes > 0: "
                             "the previous stage's pp_send_bytes")
        if topo.next_stage_rank is not None and work.pp_send_bytes <= 0:
            raise ValueError(f"rank {self.rank} (stage {topo.stage}) has pp_send_bytes=0 "
                             "but a next stage")
        if work.num_ep_layers and (work.routing is None
                                   or work.routing.ep != len(topo.ep_ranks)):
            raise ValueError(f"rank {self.rank}: StageWork has EP layers but its routing "
                             f"does not match the EP group of {len(topo.ep_ranks)} ranks")

    def _expert_layer(self, step_key: object, work: StageWork, i: int, layer: int,
                      num_tokens: int, dilation: float) -> None:
        """The MLP part of an EP layer (module docstring): dispatch, own experts, combine."""
        mlp = COMPUTE_KINDS.index("mlp")
        spec, me = work.routing, self.topology.ep_index
        routing = route(spec, replica=work.routing_replica, step=work.routing_step,
                        layer=layer, num_tokens=num_tokens)
        send = routing.dispatch[me].tolist()
        recv = routing.dispatch[:, me].tolist()
        expert_s = float(work.expert_compute_s[i])
        self._compute(mlp, layer, (float(work.mlp_compute_s[i]) - expert_s) * dilation)
        d_rows = self._coll.all_to_all("ep", layer, send, recv, work.dispatch_bytes_per_row, me)
        spr = spec.slots_per_rank
        pairs = sum(recv)
        active = int((routing.slot_tokens[me * spr:(me + 1) * spr] > 0).sum())
        own_s = max(pairs * work.expert_s_per_pair, active * work.expert_s_per_weight)
        self._compute(mlp, layer, own_s * dilation)
        c_rows = self._coll.all_to_all("ep", layer, recv, send, work.combine_bytes_per_row, me)
        self._ep_log.append(EpSplit(step_key, layer, send, recv, d_rows, c_rows, pairs))

    def run_step(self, step_key: object, work: StageWork, slot_ids: np.ndarray | None,
                 dilation: float, num_tokens: int, num_sampled: int,
                 recv_bytes: int = 0) -> StepRecords:
        """Execute this rank's stage of one plan (see the module docstring); ``recv_bytes``
        is the previous stage's ``pp_send_bytes`` (required when stage > 0)."""
        meta = self._step(step_key, work, slot_ids, dilation, num_tokens, num_sampled,
                          recv_bytes)
        return self._coll.recorder.freeze(**meta)  # the step's own recorder (begin_step)

    def _step(self, step_key: object, work: StageWork, slot_ids: np.ndarray | None,
              dilation: float, num_tokens: int, num_sampled: int, recv_bytes: int) -> dict:
        """Run the step; returns the records' scalar fields (StepRecorder.freeze)."""
        topo, coll = self.topology, self._coll
        pre, attn, mlp, post = range(len(COMPUTE_KINDS))
        coll.begin_step(step_key)
        start_s = coll.ready_s
        try:
            self._check_step(work, slot_ids, num_tokens, recv_bytes)
            if topo.prev_stage_rank is not None:
                coll.recv(topo.prev_stage_rank, recv_bytes)
            if topo.stage == 0:
                self._compute(pre, NO_LAYER, work.pre_compute_s * dilation)
                if work.embed_allreduce_bytes:
                    coll.all_reduce("tp", work.embed_allreduce_bytes, NO_LAYER)
            # The thermometer mid-stage: a step's first collectives run slower than its
            # middle ones by tens of us to ~150 us (docs/results-validation.md, repeat 16).
            probe_at = work.layer_ids.size // 2 if work.probe_bytes else -1
            for i, layer in enumerate(work.layer_ids.tolist()):
                self._compute(attn, layer, float(work.attn_compute_s[i]) * dilation)
                if i == 0 and slot_ids is not None:
                    coll.settle()
                    self._write_kv(slot_ids)
                    coll.ready_s = self._now()  # the write is real work, not bookkeeping
                if work.tp_allreduce_bytes:
                    coll.all_reduce("tp", work.tp_allreduce_bytes, layer)
                    if i == probe_at:  # the same size: the same buffer view, no re-slicing
                        coll.all_reduce("tp", work.probe_bytes, PROBE_LAYER)
                if work.ep_layers is not None and work.ep_layers[i]:
                    self._expert_layer(step_key, work, i, layer, num_tokens, dilation)
                else:
                    self._compute(mlp, layer, float(work.mlp_compute_s[i]) * dilation)
                if work.tp_allreduce_bytes:
                    coll.all_reduce("tp", work.tp_allreduce_bytes, layer)
            if topo.next_stage_rank is None:
                self._compute(post, NO_LAYER, work.post_compute_s * dilation)
                if work.logits_gather_bytes:
                    coll.all_gather("tp", work.logits_gather_bytes, NO_LAYER,
                                    len(topo.tp_ranks))
            else:
                coll.send(topo.next_stage_rank, work.pp_send_bytes)
        except BaseException as exc:
            coll.fail_step(exc)
            raise
        coll.end_step()
        self._num_steps += 1
        return dict(rank=self.rank, stage=topo.stage, step_key=step_key, start_s=start_s,
                    end_s=self._now(), num_tokens=num_tokens, num_sampled_tokens=num_sampled,
                    num_kv_rows_written=0 if slot_ids is None else len(slot_ids))

    def run_step_packed(self, payload: bytes) -> bytes:
        """:meth:`run_step` with its arguments pickled and its records packed
        (StepRecorder.pack; the driver's WorkerGroup sends one payload per stage): a Ray
        call with one bytes argument and result is ~0.25 ms cheaper to submit than one with
        seven, per rank and step. The
        payload's last item, unless None, is ``(block_ids, kv_block_size_tokens)`` of KV
        blocks freed since the replica's previous plan, released before the step runs (a
        call of its own cost the driver another ~0.5 ms per rank)."""
        *args, freed = pickle.loads(payload)
        if freed is not None:
            self.free_kv_blocks(*freed)
        meta = self._step(*args)
        return self._coll.recorder.pack(**meta)  # the step's own recorder (begin_step)

    # -- microbenchmark ---------------------------------------------------------------------
    def bench_sizes(self, op: str, sizes: list[int], num_iters: list[int],
                    num_warmup: int = 2, axis: str = "world") -> list[np.ndarray]:
        """Time ``num_iters[j]`` calls of ``op`` of each size ``sizes[j]`` over the ``axis``
        group (``emulator bench``), round robin: round i times every size j with
        ``num_iters[j] > i`` once, so a burst of load elsewhere on the host spreads over all
        sizes instead of skewing one.

        Sizes follow nccl-tests' "size": all_reduce the buffer, all_gather the gathered
        output, all_to_all each rank's send buffer, send_recv the message (group index 0
        sends to index 1, other ranks only join the barriers). Every call starts with a
        barrier so the ranks enter together, as after a step's previous collective. Returns
        one float64 [num_iters[j], 2] array of (entry_s, exit_s) per size, on the driver
        clock. Must run concurrently on every rank of the group; buffers are freed on return.
        """
        group = self._groups.get(axis) if axis != "world" else None
        if axis != "world" and group is None:
            raise ValueError(f"rank {self.rank} has no '{axis}' group")
        if op not in ("all_reduce", "all_gather", "all_to_all", "send_recv"):
            raise ValueError(f"op must be all_reduce, all_gather, all_to_all or send_recv, "
                             f"got {op!r}")
        members = dist.get_process_group_ranks(group) if group is not None else \
            list(range(dist.get_world_size()))
        n, me = len(members), members.index(self.rank)
        # Two buffers of the largest size; every call uses views of them.
        elems_max = max(1, max(sizes) // DTYPE_BYTES)
        a = torch.zeros(elems_max, dtype=DTYPE, device=self._device)
        b = torch.zeros(elems_max, dtype=DTYPE, device=self._device)

        def call_for(num_bytes: int):
            elems = max(1, num_bytes // DTYPE_BYTES)
            if op == "all_reduce":
                return lambda: dist.all_reduce(a[:elems], group=group)
            if op == "all_gather":
                shard = max(1, elems // n)
                return lambda: dist.all_gather_single(b[:shard * n], a[:shard], group=group)
            if op == "all_to_all":
                chunk = max(1, elems // n) * n
                return lambda: dist.all_to_all_single(b[:chunk], a[:chunk], group=group)
            if me == 0:
                return lambda: dist.send(a[:elems], dst=members[1], group=group)
            if me == 1:
                return lambda: dist.recv(a[:elems], src=members[0], group=group)
            return lambda: None

        calls = [call_for(size) for size in sizes]
        times = [np.empty((k, 2)) for k in num_iters]
        for i in range(num_warmup + max(num_iters)):
            for j, call in enumerate(calls):
                if i >= num_warmup + num_iters[j]:
                    continue
                dist.barrier(group=group)
                entry_s = self._now()
                call()
                self._synchronize()
                exit_s = self._now()
                if i >= num_warmup:
                    times[j][i - num_warmup] = (entry_s, exit_s)
        return times

    # -- control --------------------------------------------------------------------------
    def set_host_mode(self, mode: HostMode, local_index: int, ranks_on_node: int) -> dict:
        """How this rank waits: compute delays spun or slept (delay.spin_for), whether it
        runs its share of the node's idle-priority spinners, and whether its threads run at
        real-time priority and are pinned to a CPU of their own (runtime.awake). Returns
        ``{"spin_s": spun tail of a slept delay (None: delays are spun whole), "spinners":
        spinners this rank runs, "realtime": bool, "cpu": CPU id pinned to or None,
        "tcp_congestion": the congestion control its groups' sockets were created with
        (:func:`host_tcp_congestion`)}``."""
        cpus = cpus_available()
        waits = decide(mode, self.backend, ranks_on_node, cpus, local_index)
        pin_threads(None)  # spinners start unpinned: they keep every CPU awake
        self._spinners.start(spinners_for(local_index, ranks_on_node, cpus)
                             if waits.keep_awake else 0)
        self.cpu = pin_threads(waits.cpu_slot)
        self.spin_s = waits.spin_s
        if waits.realtime != self.realtime:
            set_realtime(waits.realtime)
            self.realtime = waits.realtime
        if self.backend != "nccl":
            spin_s = self.spin_s
            self._coll.delay = lambda seconds: precise_sleep(seconds, spin_s)
        spun_whole = self.spin_s == float("inf")  # JSON has no infinity: None
        return {"spin_s": None if spun_whole else self.spin_s,
                "spinners": self._spinners.count,
                "realtime": self.realtime, "cpu": self.cpu,
                "tcp_congestion": self.tcp_congestion}

    @ray.method(concurrency_group="control")
    def ping(self) -> int:
        return self.rank

    @ray.method(concurrency_group="control")
    def clock(self) -> float:
        """This node's raw monotonic clock in seconds (no offset), for offset estimation."""
        return time.monotonic_ns() * 1e-9

    @ray.method(concurrency_group="control")
    def set_clock_offset(self, offset_s: float) -> None:
        """Records are stamped ``monotonic + offset_s`` (driver time) from now on."""
        self._clock_offset_s = offset_s

    @ray.method(concurrency_group="control")
    def collective_state(self, step_key: object = None) -> CollectiveState:
        """Where this rank is in the collectives of step ``step_key`` (default: its current
        step; TimedCollectives.state)."""
        return self._coll.state(step_key)

    @ray.method(concurrency_group="control")
    def ep_splits(self) -> list[EpSplit]:
        """The all-to-all splits of the last EP layers run (oldest first, at most
        EP_LOG_STEPS), for checking them against the routing."""
        return list(self._ep_log)

    def skip_next_collective(self) -> None:
        """Fault injection: this rank silently skips its next collective. Queued behind
        the steps already submitted to it (not a control call), so the fault lands in the
        first step submitted after it, even where a step runs meanwhile."""
        self._coll.skip_next_collective()

    def teardown(self) -> None:
        self._spinners.stop()
        if dist.is_initialized():
            dist.destroy_process_group()
        self._weights = []
        self._kv_pool = None
