"""The host-overhead probe of `emulator calibrate`: near-empty steps on the Ray workers,
measured the way the emulator measures its steps, fitted into a :class:`HostOverhead`.

A probe step is one stage of ``L`` layers on a TP group of all ranks: the worker's normal
step program (``Worker.run_step``: delay, all-reduce, delay, all-reduce, ...) with every
compute delay ``d`` host seconds (dilation 1) and all-reduces of ``num_bytes``. For each
delay length ``d`` on a grid:

- ``delay_excess(d)``: per rank, how much longer than ``d`` the delay itself lasted (sleep
  overshoot, recording), averaged; the rest of the time from leaving collective k-1 to
  entering collective k, minus ``d``, is the call into the collective:
  ``collective_call_s``, the median over the grid (it does not depend on ``d``);
- ``collective_excess(d)``: the critical path of a segment, ``max exit_k - max exit_{k-1}``
  over ranks, minus ``d``, ``delay_excess(d)`` and the benchmark line of collective k;
- ``wake(d)``: ``max exit_k - max entry_k`` (the transfer once the last rank has entered)
  minus the line: how much slower than back to back a collective after an idle delay is;
- ``kv_write_s``: every probe step writes KV rows after its first attention delay, as a
  run's steps do; its first segment less the median of its others is that write (and the
  first segment is kept out of the terms above).

Then at ``d = 1 ms`` with two layer counts: ``step_fixed_s`` (per rank, the time before
the first collective less its delay plus the time after the last collective) and the gap between steps — the driver submits, waits for every rank's records, turns them
into collective rows as the emulation loop does, and submits the next step; ``start of step
k+1 - end of step k`` against the number of collective rows gives ``step_gap_s`` and
``step_gap_s_per_collective``.

Pipeline transfers are probed on a second, 2-stage group (:func:`measure_pipeline_wake`):
real 2-stage steps with two plans in flight, one stage slower than the other by an idle
time on a grid, in both orders (the receiver idles in its recv, or the sender in its send);
the stages run the program of a step of the run to be priced when there is one
(:func:`pipeline_stages`, writing its KV rows too), and each curve is placed at the idle
times measured; each stage role's time outside its delays gives ``p2p_stage_fixed_s``.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

from emulator.core.work import StageWork, StepWork
from emulator.cost.comm import HostOverhead, P2PWakeCurves
from emulator.runtime.delay import SPIN_S
from emulator.runtime.records import COMPUTE_KINDS, PROBE_LAYER

# precise_sleep only spins below SPIN_S and sleeps (yields the core) above it: on a busy
# host the overheads jump there, so the grid brackets it closely.
DELAY_GRID_S = (0.0, 1e-4, 0.9 * SPIN_S, 1.1 * SPIN_S, 4e-4, 1e-3, 3e-3, 1e-2)
P2P_IDLE_GRID_S = (0.0, 1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1)
GRID_LAYERS = 8
GAP_LAYERS = (4, 32)
PROBE_BYTES = 64 * 1024
PIPELINE_BUSY_S = 40e-3
"""Host seconds of layers per stage in the pipeline probe at most (pipeline_stages). Enough
for a whole stage of llama-3.1-8b at PP=2 and dilation 50 (~20 ms): cut to 4 ms there (3
of its 16 layers), the probe put the wake-up of a sender that waited ~17 ms for the recv at
16-127 us over the line in nine runs whose transfers took 102-185 us over it (predicted -7%
to -23% in seven, mean -12.2%); with the whole stage, within 10% in seven runs of thirteen,
mean -11.0%: a more faithful program, no established gain (docs/results-validation.md,
repeat 11)."""


KV_PROBE_ROWS = 32
"""KV rows a TP probe step writes when no run sizes it (a decode step of 32 requests)."""
KV_PROBE_ROW_ELEMS = 32
"""Elements per KV row of a probe's pool when no run sizes it (llama-3.1-8b at PP=2 and the
default memory_scale 1e-3: 33)."""


def kv_probe_slots(group, num_rows: int, row_elems: int) -> np.ndarray:
    """Slot ids ``0 .. num_rows - 1`` of a KV pool just large enough for them, allocated on
    every rank of ``group`` (replacing any pool they held), so that probe steps write their
    KV rows as a run's steps do (Worker._write_kv, right after the first layer's attention
    delay): on the development VM that write took ~130-160 us a step and stage at PP=2,
    dilation 1 (32 rows), which no probe measured, so the simulator priced every stage of
    every step short by it (docs/results-validation.md, repeat 12)."""
    bs = 16
    group.allocate([], -(-max(1, num_rows) // bs), bs * max(1, row_elems), 1.0,
                   kv_block_size_tokens=bs)
    return np.arange(max(1, num_rows), dtype=np.int64)


def kv_write_excess(gaps: np.ndarray, index: int) -> tuple[float | None, np.ndarray]:
    """(``gaps[index]`` less the median of the other gaps, the other gaps): the KV write,
    from a row of like gaps of one step (between its consecutive delays, or its segments
    between collectives) of which only the one at ``index`` holds it; None without others."""
    gaps = np.asarray(gaps, dtype=np.float64)
    others = np.delete(gaps, index)
    if not others.size:
        return None, others
    return float(gaps[index] - np.median(others)), others


def probe_work(num_layers: int, delay_s: float, num_bytes: int,
               gather_bytes: int | None = None, num_tokens: int = 1,
               thermometer: bool = False) -> StepWork:
    """A TP probe step: every delay ``delay_s``, every all-reduce ``num_bytes``; with
    ``thermometer`` also validate's thermometer all-reduce (mid-stage, back to back)."""
    layers = np.arange(num_layers, dtype=np.int64)
    stage = StageWork(stage=0, layer_ids=layers, attn_compute_s=np.full(num_layers, delay_s),
                      mlp_compute_s=np.full(num_layers, delay_s),
                      tp_allreduce_bytes=num_bytes, pre_compute_s=delay_s,
                      embed_allreduce_bytes=num_bytes, post_compute_s=delay_s,
                      logits_gather_bytes=num_bytes if gather_bytes is None else gather_bytes,
                      probe_bytes=num_bytes if thermometer else 0)
    return StepWork(stages=[stage], num_tokens=num_tokens, num_sampled_tokens=1)


def _segments(recs, delay_s: float, line_s: np.ndarray):
    """(per-rank segment excess [ranks, C-1], critical-path excess [C-1], transfer - line
    [C], excess of the delays themselves [ranks, K]) of one probe step; TP ranks run the
    same program, so position k is one instance."""
    entry = np.stack([x.coll_entry_s for x in recs])  # [ranks, C]
    exit_ = np.stack([x.coll_exit_s for x in recs])
    seg = entry[:, 1:] - exit_[:, :-1] - delay_s
    crit = np.diff(exit_.max(axis=0)) - delay_s - line_s[1:]
    transfer = exit_.max(axis=0) - entry.max(axis=0) - line_s
    sleep = np.stack([x.comp_end_s - x.comp_start_s for x in recs]) - delay_s
    return seg, crit, transfer, sleep


def _without_thermometer(parts, coll_layer: np.ndarray):
    """(:func:`_segments`' output without the thermometer call and the segment into it,
    the thermometer's transfer - line). The segment after it (its exit to the next entry,
    a delay apart) stands for the one it interrupted."""
    seg, crit, transfer, sleep = parts
    k = int(np.flatnonzero(np.asarray(coll_layer) == PROBE_LAYER)[0])
    return (np.delete(seg, k - 1, axis=1), np.delete(crit, k - 1), np.delete(transfer, k),
            sleep), float(transfer[k])


class HostProbe(NamedTuple):
    """What the host probe measured: the overheads, and per op whose line it re-measured at
    a run's size, how many times its line's time the op took (``line_factors``)."""
    host: HostOverhead
    line_factors: dict[str, float]


def measure_host_overhead(group, line_s, *, num_steps: int = 16,
                          grid_s: tuple[float, ...] = DELAY_GRID_S,
                          num_bytes: int = PROBE_BYTES,
                          gather_bytes: int | None = None,
                          gap_model: tuple[str, str] = ("tiny", "h100"),
                          host_mode=None, kv_rows: int = KV_PROBE_ROWS,
                          kv_row_elems: int = KV_PROBE_ROW_ELEMS) -> HostProbe:
    """Run probe steps on ``group`` (a WorkerGroup with layout tp = world) and fit.
    ``line_s(op, num_bytes)``: the benchmark line's time of one op (host seconds; all_gather
    bytes = gathered output), so excesses are measured against what the simulator prices.

    ``gather_bytes`` (a run's logits all-gather per rank): the probe steps end with an
    all-gather of that size instead of ``num_bytes``, which is kept out of the fit above
    and gives ``line_factors["all_gather"]``: the median over every probe step of (its
    transfer - ``wake(d)`` at the step's delay) / its line. On a shared host the speed of
    MB-sized messages drifts by tens of percent over minutes, apart from that of the run's
    activations, so the all-gather's line from `calibrate` misprices a run later on; the
    probe measures it in the step program, spread over the probe's ~15 s.

    ``gap_model``: (model, hardware) of the step-gap probe (:func:`measure_step_gap`), run
    with the ranks in ``host_mode`` (awake.HostMode; None: the defaults).

    Every probe step writes ``kv_rows`` KV rows of ``kv_row_elems`` elements (a run's median
    step's; :func:`kv_probe_slots`) after its first attention delay, as a run's steps do:
    the first segment (that delay, the write, the call into the first layer's all-reduce)
    less the median of the step's other segments is ``kv_write_s``, and the first segment
    is kept out of the per-collective terms.

    Every probe step also runs validate's thermometer (an all-reduce of ``num_bytes`` back to
    back after the middle layer's first one, as a run's steps do under `validate`): its
    transfer excess per delay is ``thermometer_wake_s``, and it is kept out of the other
    terms (:func:`_without_thermometer`)."""
    n = group.world_size
    gather = num_bytes if gather_bytes is None else gather_bytes
    # The probe program: embed all-reduce, 2 per layer, logits all-gather (output n x bytes),
    # and validate's thermometer after the middle layer's first all-reduce, measured on its
    # own and kept out of the rest (:func:`_without_thermometer`).
    lines = np.array([line_s("all_reduce", num_bytes)] * (2 * GRID_LAYERS + 2)
                     + [line_s("all_gather", gather * n)])
    # Round-robin over the grid, one step at a time, so a burst of load from elsewhere on
    # the host spreads over all delay lengths instead of skewing one; per grid point, the
    # median over steps of each step's mean (robust to a burst, unlike a pooled mean).
    work = {d: probe_work(GRID_LAYERS, d, num_bytes, gather, num_tokens=kv_rows,
                          thermometer=True) for d in grid_s}
    slots = kv_probe_slots(group, kv_rows, kv_row_elems)
    parts: dict[float, list] = {d: [] for d in grid_s}
    therm: dict[float, list[float]] = {d: [] for d in grid_s}
    fixed = []
    for i in range(num_steps + 1):
        for d in grid_s:
            recs = group.run_replica_step(0, work[d], slots, 1.0, step_key=("probe", d, i))
            if i == 0:
                continue  # warm-up
            part, therm_excess = _without_thermometer(_segments(recs, d, lines),
                                                      recs[0].coll_layer)
            parts[d].append(part)
            therm[d].append(therm_excess)
            # Outside the segments: from the step's start to entering the first collective
            # (less the embedding delay), and from leaving the last one to the step's end.
            fixed += [(x.coll_entry_s[0] - x.start_s - d) + (x.end_s - x.coll_exit_s[-1])
                      for x in recs]
    # With a run's all-gather the last segment and transfer are that op's own.
    keep = slice(None) if gather_bytes is None else slice(None, -1)
    delay_excess, coll_excess, wake, call, gathered = [], [], [], [], []
    # Segment 0 (the first attention delay, then the KV write) on its own: the KV write.
    kv = [kv_write_excess(row, 0)[0] for d in grid_s for p in parts[d] for row in p[0]]
    for d in grid_s:
        seg = np.array([p[0][:, 1:].mean() for p in parts[d]])
        crit = np.array([p[1][1:][keep].mean() for p in parts[d]])
        sleep = np.array([p[3].mean() for p in parts[d]])
        # A segment is the delay's own excess (what a pipeline-only stage, whose delays
        # follow each other, pays too) plus the call into the collective after it.
        delay_excess.append(max(0.0, float(np.median(sleep))))
        call.append(float(np.median(seg - sleep)))
        coll_excess.append(float(np.median(crit - seg)))
        # Transfer times are heavy-tailed on a VM (p90 several times the median): the
        # median over every instance of every step, not a median of per-step medians.
        wake.append(float(np.median(np.concatenate([p[2][keep] for p in parts[d]]))))
        gathered += [lines[-1] + p[2][-1] - wake[-1] for p in parts[d]]
    gap0, gap_per = measure_step_gap(group, model=gap_model[0], hardware=gap_model[1],
                                     host_mode=host_mode)
    host = HostOverhead(num_ranks=n, step_gap_s=gap0, step_gap_s_per_collective=gap_per,
                        step_fixed_s=max(0.0, float(np.median(fixed))),
                        kv_write_s=max(0.0, float(np.median(kv))),
                        collective_call_s=max(0.0, float(np.median(call))),
                        delay_grid_s=list(grid_s), delay_excess_s=delay_excess,
                        collective_excess_s=coll_excess, wake_s=wake,
                        thermometer_wake_s=[float(np.median(therm[d])) for d in grid_s])
    factors = ({} if gather_bytes is None else
               {"all_gather": max(0.01, float(np.median(gathered)) / float(lines[-1]))})
    return HostProbe(host, factors)


def pipeline_work(delay_s: tuple[float, float], num_bytes: int) -> StepWork:
    """A 2-stage plan: stage s waits ``delay_s[s]`` in one layer; stage 0 sends ``num_bytes``
    of activations to stage 1."""
    one = np.zeros(1)
    return StepWork(stages=[
        StageWork(stage=0, layer_ids=np.array([0]), attn_compute_s=np.array([delay_s[0]]),
                  mlp_compute_s=one, tp_allreduce_bytes=0, pp_send_bytes=num_bytes),
        StageWork(stage=1, layer_ids=np.array([1]), attn_compute_s=np.array([delay_s[1]]),
                  mlp_compute_s=one, tp_allreduce_bytes=0)], num_tokens=1, num_sampled_tokens=1)


def pipeline_stages(template: StepWork, dilation: float, num_bytes: int,
                    max_busy_s: float = PIPELINE_BUSY_S) -> StepWork:
    """The program around a pipeline transfer in a run, as a 2-stage plan of delays only:
    the run's first stage (embedding, layers, send of ``num_bytes``) and last stage (recv,
    layers, LM head) of ``template`` (one of its steps), without TP or EP collectives, each
    cut to as many of its leading layers as fit in ``max_busy_s`` host seconds at
    ``dilation`` (at least one; the embedding and LM-head delays cut to ``max_busy_s``
    too), so that a probe of a slow run stays short. The wake-up
    cost of a transfer depends on what the ranks did just before it (on the development VM
    a run's 16 layers of ~0.1 ms delays made the same idle receiver 10-25% slower to wake
    than one 1-layer delay)."""
    cap = max_busy_s / dilation

    def cut(st: StageWork, stage: int, first: bool) -> StageWork:
        per_layer = (st.attn_compute_s + st.mlp_compute_s) * dilation
        keep = int(np.clip(max_busy_s // max(float(per_layer.mean()), 1e-12), 1,
                           per_layer.size))
        return StageWork(stage=stage, layer_ids=np.arange(keep) + stage * keep,
                         attn_compute_s=st.attn_compute_s[:keep].copy(),
                         mlp_compute_s=st.mlp_compute_s[:keep].copy(), tp_allreduce_bytes=0,
                         pre_compute_s=min(st.pre_compute_s, cap) if first else 0.0,
                         post_compute_s=0.0 if first else min(st.post_compute_s, cap),
                         pp_send_bytes=num_bytes if first else 0)
    return StepWork(stages=[cut(template.stages[0], 0, True), cut(template.stages[-1], 1, False)],
                    num_tokens=template.num_tokens, num_sampled_tokens=template.num_sampled_tokens)


def with_idle(work: StepWork, dilation: float, idle_s: float, sender_waits: bool) -> StepWork:
    """``work`` (2 stages) with one stage lengthened so that the other one idles ``idle_s``
    host seconds per plan at the transfer, two plans in flight: stage 0 longer than stage 1
    by ``idle_s`` (the receiver idles in its recv), or with ``sender_waits`` stage 1 longer
    (the sender idles in its send). Extra time goes to stage 0's embedding delay or stage
    1's LM-head delay; the step boundary's own costs come on top (the probe measures the
    idle time it got)."""
    first, last = work.stages
    busy = [st.compute_s * dilation for st in (first, last)]
    extra = idle_s - ((busy[1] - busy[0]) if sender_waits else (busy[0] - busy[1]))
    slow_last = sender_waits == (extra >= 0)
    extra = abs(extra) / dilation
    first, last = copy.copy(first), copy.copy(last)
    if slow_last:
        last.post_compute_s += extra
    else:
        first.pre_compute_s += extra
    return StepWork(stages=[first, last], num_tokens=work.num_tokens,
                    num_sampled_tokens=work.num_sampled_tokens)


def measure_pipeline_wake(group, line_s, num_bytes: int = PROBE_BYTES,
                          grid_s: tuple[float, ...] = P2P_IDLE_GRID_S, num_steps: int = 24,
                          template: StepWork | None = None, dilation: float = 1.0,
                          kv_row_elems: int = KV_PROBE_ROW_ELEMS,
                          warm_bytes: int | None = None,
                          sizes: tuple[int, ...] = ()) -> dict:
    """The pipeline fields of a HostOverhead (p2p_idle_grid_s, p2p_wake_s, p2p_send_wake_s,
    p2p_recv_idle_s, p2p_send_idle_s, delay_gap_s, p2p_stage_fixed_s, and with a template
    kv_write_s), measured the way an emulation runs its transfers:
    ``group`` is a 2-stage WorkerGroup (layout pp=2) and the driver keeps two plans in
    flight, as with two micro-batches. For each idle time d on the grid, once with stage 0
    slower by d (stage 1 idles in its recv for the activations) and once with stage 1 slower
    by d (stage 0 idles in its send until the recv is posted; gloo's send waits for it): per
    transfer, (max exit - max entry) - the line, median over the steps, placed at the
    median idle time measured (max entry - min entry). The step boundaries (results shipped
    to the driver, the next call started) fall right around these transfers, so they cost
    more than in a bare microbenchmark. The stages' delays follow each other (no TP), so
    the gaps between them are ``delay_gap_s`` (median over stages and plans of the mean gap).

    The stages run ``template``'s program at ``dilation`` (:func:`pipeline_stages`: the
    run being validated), or without one a single delay each. With a template each stage
    also writes the step's KV rows (``template.num_tokens`` of ``kv_row_elems`` elements)
    after its first attention delay, as in the run: that gap less the median of the
    stage's other gaps is ``kv_write_s`` (returned only then), and it is kept out of
    ``delay_gap_s``.

    ``warm_bytes`` (a run's largest transfer, its prefill's): one plan moving that many bytes
    goes first, so that the pipeline's sockets have carried a message that large, as a
    run's have by the time its decode transfers happen. On the development VM, after one
    8.4 MB message, sender-waited transfers of 128 KiB and more took 50-80 us longer than
    on fresh sockets and smaller ones did not (docs/results-validation.md, repeat 15). In a
    run such a step came with the host's BBR, which paces a socket at a bandwidth estimated
    from the socket's own traffic, and in one window went with cubic; in others it came
    under cubic too (repeat 18).

    ``sizes`` (more transfer sizes, e.g. a run's quartiles): each grid point is probed
    with ``num_bytes`` and each of these in turn, a block of ``num_steps`` plans per size
    (a run's transfer mostly follows one of its own size: its decode batches change
    slowly), and the result also holds the curves of each size (``p2p_by_size``,
    HostOverhead.p2p_by_size); the other fields are ``num_bytes``'s."""
    attn = COMPUTE_KINDS.index("attn")
    sizes = tuple(sorted({num_bytes, *sizes}))
    slots = None
    if template is None:
        base_s = 2e-4  # the faster stage's delay
        work_at = lambda d, sender_waits, b: pipeline_work(  # noqa: E731
            (base_s, base_s + d) if sender_waits else (base_s + d, base_s), b)
        dilation = 1.0
    else:
        shapes = {b: pipeline_stages(template, dilation, b) for b in sizes}
        work_at = lambda d, sender_waits, b: with_idle(  # noqa: E731
            shapes[b], dilation, d, sender_waits)
        slots = kv_probe_slots(group, template.num_tokens, kv_row_elems)
    if warm_bytes:
        group.collect(group.submit_replica_step(0, pipeline_work((2e-4, 2e-4), warm_bytes),
                                                None, 1.0, step_key=("p2p-warm",)))
    warmup = 2     # plans whose transfers fall while the pipeline fills
    lines = {b: line_s("send_recv", b) for b in sizes}
    # per (sender waited, size): per grid point, the median excess and idle time
    wakes: dict[tuple[bool, int], list[float]] = {}
    idles: dict[tuple[bool, int], list[float]] = {}
    gaps: list[float] = []  # per stage and plan: mean time between consecutive delays
    kv: list[float] = []  # per stage and plan: the KV write (with a template)
    fixed: dict[int, list[float]] = {0: [], 1: []}  # per stage: time outside the delays
    for sender_waits in (False, True):
        for d in grid_s:
            # a block of plans per size: a run's transfers mostly follow one of their size
            for b in sizes:
                work = work_at(d, sender_waits, b)
                submit = lambda i: group.submit_replica_step(  # noqa: E731
                    0, work, slots, dilation, step_key=("p2p", sender_waits, d, b, i))
                in_flight, excess, idle = submit(0), [], []
                for i in range(1, warmup + num_steps + 1):
                    nxt = submit(i)  # two plans in flight while the older one is collected
                    recs = group.collect(in_flight)
                    in_flight = nxt
                    if i <= warmup:
                        continue
                    # one transfer per plan: (max exit - max entry) - line
                    entry = [r.coll_entry_s[0] for r in recs]
                    excess.append(max(r.coll_exit_s[0] for r in recs) - max(entry) - lines[b])
                    idle.append(max(entry) - min(entry))
                    for stage, r in enumerate(recs):
                        # the stage's begin (stage 0: its step's start; stage 1: its recv's
                        # end) to its first delay, and its last delay to its send or end
                        begin = r.start_s if stage == 0 else r.coll_exit_s[0]
                        end = r.coll_entry_s[0] if stage == 0 else r.end_s
                        fixed[stage].append(float(r.comp_start_s[0] - begin
                                                  + end - r.comp_end_s[-1]))
                        g = r.comp_start_s[1:] - r.comp_end_s[:-1]
                        if slots is not None:  # the KV write follows the first attention
                            write, g = kv_write_excess(
                                g, int(np.flatnonzero(r.comp_kind == attn)[0]))
                            if write is not None:
                                kv.append(write)
                        if g.size:
                            gaps.append(float(np.mean(g)))
                group.collect(in_flight)
                wakes.setdefault((sender_waits, b), []).append(float(np.median(excess)))
                idles.setdefault((sender_waits, b), []).append(float(np.median(idle)))
    out = {"p2p_idle_grid_s": list(grid_s), "p2p_wake_s": wakes[False, num_bytes],
           "p2p_send_wake_s": wakes[True, num_bytes], "p2p_recv_idle_s": idles[False, num_bytes],
           "p2p_send_idle_s": idles[True, num_bytes],
           "delay_gap_s": max(0.0, float(np.median(gaps))) if gaps else 0.0,
           "p2p_stage_fixed_s": [max(0.0, float(np.median(fixed[s]))) for s in (0, 1)]}
    if kv:
        out["kv_write_s"] = max(0.0, float(np.median(kv)))
    if len(sizes) > 1:
        out["p2p_by_size"] = [P2PWakeCurves(
            num_bytes=b, wake_s=wakes[False, b], send_wake_s=wakes[True, b],
            recv_idle_s=idles[False, b], send_idle_s=idles[True, b]) for b in sizes]
    return out


def measure_step_gap(group, layers: tuple[int, ...] = GAP_LAYERS,
                     model: str = "tiny", hardware: str = "h100",
                     host_mode=None) -> tuple[float, float]:
    """(step_gap_s, step_gap_s_per_collective): the real emulation loop (executor.Emulation:
    scheduling, KV frees, record keeping) on a small offline batch of ``model`` (on
    ``hardware``; the 'tiny' model when that one cannot be laid out over the group) with
    ``layers`` decoder layers, at dilation 1; the gap between consecutive steps against the
    collective records each step ships back. The model matters: adjacent in time on the
    development VM, the tiny model's steps were 6.6-7.1 ms apart and llama-3.1-8b's 4.3-4.8
    ms, as in a real llama-3.1-8b TP=2 run (4.2-4.3 ms; docs/results-validation.md, repeat
    9), so `validate` probes with the run's model."""
    gaps, rows = [], []
    for num_layers in layers:
        steps = _probe_run(group, model, hardware, num_requests=4, prompt_tokens=16,
                           output_tokens=16, num_layers=num_layers, host_mode=host_mode,
                           tp=group.world_size).steps
        start, end = steps["start_s"].to_numpy(), steps["end_s"].to_numpy()
        gaps += (start[1:] - end[:-1]).tolist()
        rows += [group.world_size * (2 * num_layers + 2)] * (len(start) - 1)
    return _line(np.array(rows, dtype=np.float64), np.array(gaps))


def _probe_run(group, model: str, hardware: str, *, num_requests: int, prompt_tokens: int,
               output_tokens: int, num_layers: int | None = None, host_mode=None,
               **layout):
    """The tables (RunTables) of the emulation loop (executor.Emulation) on ``group`` at
    dilation 1: an offline batch of ``num_requests`` fixed-length requests of ``model`` on
    ``hardware`` (the 'tiny' model when that one cannot be laid out as ``layout`` says),
    with ``num_layers`` decoder layers if given, the ranks waiting in ``host_mode``
    (awake.HostMode, as the run to be priced; None: the defaults)."""
    from emulator.build import build_run
    from emulator.config import build_config
    from emulator.cost import CostModel
    from emulator.errors import UserError
    from emulator.runtime.executor import Emulation
    from emulator.trace.io import write_trace
    from emulator.trace.synth import synth_trace

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "probe.arrow"
        write_trace(synth_trace(num_requests=num_requests, lengths="fixed", arrival="batch",
                                prompt_tokens=prompt_tokens, output_tokens=output_tokens,
                                seed=0), path)
        # The synchronous loop (validate runs it; RunConfig.run_ahead): its gap between
        # steps is the driver's round trip, which the probes measure.
        kw = dict(trace=path, dilation=1.0, memory_scale=1e-3, timeout_s=group.timeout_s,
                  run_ahead=False, **layout)
        if host_mode is not None:  # Emulation.allocate sets the group's mode from these
            kw.update(delay_mode=host_mode.delay_mode, keep_awake=host_mode.keep_awake,
                      rank_priority=host_mode.rank_priority, pin_ranks=host_mode.pin_ranks,
                      driver_priority=host_mode.driver_priority)
        try:
            setup = build_run(build_config(model=model, hardware=hardware, **kw),
                              record_slots=True)
        except UserError:  # e.g. a model that needs more ranks than the group has
            setup = build_run(build_config(model="tiny", **kw), record_slots=True)
        if num_layers is not None:
            setup.model = setup.model.model_copy(update={"num_layers": num_layers})
            setup.cost = CostModel(setup.model, setup.hardware, setup.layout)
        emu = Emulation(setup, group)
        emu.allocate()
        emu.run()
        return emu.tables()


QUEUED_START_S = 3e-4
"""A stage that starts within this of its previous step's end took the plan from its actor's
queue: the plan had arrived before the stage was free (measure_pipeline_gap)."""


def measure_pipeline_gap(group, model: str = "tiny", hardware: str = "h100",
                         num_requests: int = 32, host_mode=None) -> tuple[float, float]:
    """(round trip, driver busy per step): the driver's round trip between a micro-batch's
    steps in a pipeline, and the driver's own work per step meanwhile (host seconds):
    the real emulation loop on ``group`` (a WorkerGroup with layout pp = world) running an
    offline batch of ``num_requests`` of ``model`` (the 'tiny' model when that one cannot
    be laid out over the group), at dilation 1, with a plan per stage in flight (prompts
    of 64 tokens, 32 output tokens each). Per micro-batch and step, stage 0's start minus
    the last stage's end of the micro-batch's previous step, unless the start waited for
    stage 0 (:func:`pipeline_round_trips`, which the simulator models itself); the mean
    over those. The driver's busy time per step (executor.ControlStats: scheduling, pricing,
    submitting, record keeping) is the probe's speed of the driver: the round trip follows
    it from run to run (HostOverhead.step_gap_driver_s).

    The driver handles one micro-batch's completion while the stages run the others, so
    its round trip is not that of a loop with idle ranks: on the development VM, with the
    driver at real-time priority, a PP=2 llama-3.1-8b run at dilation 1 had round trips of
    4.4-4.6 ms (median per run) where the TP probe (:func:`measure_step_gap`) said
    3.1-3.5 ms (docs/results-validation.md, repeat 10)."""
    tables = _probe_run(group, model, hardware, num_requests=num_requests, prompt_tokens=64,
                        output_tokens=32, host_mode=host_mode, pp=group.world_size)
    steps, control = tables.steps, tables.extra["control"]
    gap = float(np.mean(pipeline_round_trips(
        *(steps[c].to_numpy() for c in ("micro_batch", "step", "stage", "start_s", "end_s")))))
    return gap, control["driver_busy_s"] / max(1, control["num_steps"])


def pipeline_round_trips(micro_batch: np.ndarray, step: np.ndarray, stage: np.ndarray,
                         start_s: np.ndarray, end_s: np.ndarray) -> np.ndarray:
    """Per consecutive pair of a micro-batch's steps (step rows: one per stage), stage 0's
    start of the later minus the last stage's end of the earlier, except where the later
    started within QUEUED_START_S of stage 0's previous end (of any micro-batch) after the
    earlier had ended: that plan waited in the queue for stage 0, so its start says only
    that the round trip was shorter. Raises ValueError when no pair is left."""
    last = stage.max()
    first = stage == 0
    s0_start, s0_end = start_s[first], end_s[first]
    out = []
    for mb in np.unique(micro_batch):
        head = np.flatnonzero(first & (micro_batch == mb))
        tail = np.flatnonzero((stage == last) & (micro_batch == mb))
        head = head[np.argsort(step[head])]
        tail = tail[np.argsort(step[tail])]
        for prev, nxt in zip(tail[:-1], head[1:]):
            formed, started = end_s[prev], start_s[nxt]
            # stage 0's latest end before this start (its previous step, any micro-batch)
            before = s0_end[s0_start < started]
            if before.size and formed < before.max() > started - QUEUED_START_S:
                continue  # the plan waited for stage 0
            out.append(started - formed)
    if not out:
        raise ValueError("every step of the pipeline waited for stage 0: no round trip to "
                         "measure")
    return np.array(out)


def _line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares (intercept, slope), both clipped at 0 (noise can tip either below)."""
    slope, intercept = np.polyfit(x, y, 1)
    if slope < 0:
        return max(0.0, float(np.mean(y))), 0.0
    if intercept < 0:
        return 0.0, max(0.0, float((x @ y) / (x @ x)))
    return float(intercept), float(slope)
