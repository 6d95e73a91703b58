"""The host-overhead probe of `emulator calibrate`: near-empty steps on the Ray workers,
measured the way the emulator measures its steps, fitted into a :class:`HostOverhead`.

A probe step is one stage of ``L`` layers on a TP group of all ranks: the worker's normal
step program (``Worker.run_step``) with every compute delay ``delay_s`` (host seconds,
dilation 1) and small all-reduces, so everything but the delays and the transfers is
overhead. Two layer counts separate the per-step from the per-delay terms:

- per rank, ``excess = (end - start) - sum(collective exit - entry) - sum(nominal delays)``;
  a least-squares line of excess against the number of delays gives ``step_fixed_s``
  (intercept) and ``per_delay_s`` (slope): sleep overshoot, Python and recording;
- ``sync_wait_s``: over every group collective, the mean over ranks of
  ``max(entry) - own entry`` (how much later than the mean rank the last one arrives; the
  step waits for the last one);
- the gap between steps: the driver submits, waits for every rank's records, turns them
  into collective rows as the emulation loop does, and submits the next step; ``start of
  step k+1 - end of step k`` (max over ranks) against the number of collective rows gives
  ``step_gap_s`` and ``step_gap_s_per_collective``.
"""

from __future__ import annotations

import numpy as np

from emulator.core.work import StageWork, StepWork
from emulator.cost.comm import HostOverhead
from emulator.metrics.records import CollectiveRecords
from emulator.runtime.records import AXES, OPS

PROBE_LAYERS = (2, 16)
PROBE_DELAY_S = 1e-3
PROBE_BYTES = 4096


def probe_work(num_layers: int, delay_s: float, num_bytes: int) -> StepWork:
    layers = np.arange(num_layers, dtype=np.int64)
    stage = StageWork(stage=0, layer_ids=layers, attn_compute_s=np.full(num_layers, delay_s),
                      mlp_compute_s=np.full(num_layers, delay_s),
                      tp_allreduce_bytes=num_bytes, pre_compute_s=delay_s,
                      embed_allreduce_bytes=num_bytes, post_compute_s=delay_s,
                      logits_gather_bytes=num_bytes)
    return StepWork(stages=[stage], num_tokens=1, num_sampled_tokens=1)


def _as_rows(recs) -> None:
    """The emulation loop's per-step record keeping (executor._record_collectives), so the
    probe's driver does comparable work between steps."""
    out = CollectiveRecords()
    for x in recs:
        c = x.num_collectives
        out.extend({"rank": np.full(c, x.rank), "stage": np.zeros(c, np.int64),
                    "layer": x.coll_layer, "axis": np.array(AXES, dtype=object)[x.coll_axis],
                    "op": np.array(OPS, dtype=object)[x.coll_op],
                    "group": np.full(c, "tp", dtype=object), "seq": np.arange(c),
                    "bytes": x.coll_bytes, "entry_s": x.coll_entry_s, "exit_s": x.coll_exit_s,
                    "replica": np.zeros(c, np.int64), "step": np.zeros(c, np.int64)})


def step_overheads(recs, delay_s: float) -> tuple[list[float], list[float], list[float]]:
    """(per-rank excess, per-rank number of delays, per-instance mean sync wait) of one
    probe step's records (TP ranks run the same program, so position k is one instance)."""
    excess, num_delays = [], []
    for x in recs:
        coll = float((x.coll_exit_s - x.coll_entry_s).sum())
        k = x.comp_kind.size
        excess.append((x.end_s - x.start_s) - coll - k * delay_s)
        num_delays.append(float(k))
    entries = np.stack([x.coll_entry_s for x in recs])  # [ranks, C]
    sync = (entries.max(axis=0) - entries).mean(axis=0)
    return excess, num_delays, sync.tolist()


def measure_host_overhead(group, *, num_steps: int = 12, delay_s: float = PROBE_DELAY_S,
                          layers: tuple[int, ...] = PROBE_LAYERS,
                          num_bytes: int = PROBE_BYTES) -> HostOverhead:
    """Run probe steps on ``group`` (a WorkerGroup whose layout is tp = world) and fit."""
    excess, delays, sync, gaps, rows = [], [], [], [], []
    for num_layers in layers:
        work = probe_work(num_layers, delay_s, num_bytes)
        prev_end = None
        for i in range(num_steps + 1):  # the first step warms up
            recs = group.run_replica_step(0, work, None, 1.0, step_key=("probe", num_layers, i))
            _as_rows(recs)
            start = max(x.start_s for x in recs)
            if prev_end is not None:
                gaps.append(start - prev_end)
                rows.append(float(sum(x.num_collectives for x in recs)))
            prev_end = max(x.end_s for x in recs)
            if i == 0:
                continue
            e, d, s = step_overheads(recs, delay_s)
            excess += e
            delays += d
            sync += s
    fixed, per_delay = _line(np.array(delays), np.array(excess))
    gap0, gap_per = _line(np.array(rows), np.array(gaps))
    return HostOverhead(num_ranks=group.world_size, step_gap_s=gap0,
                        step_gap_s_per_collective=gap_per, step_fixed_s=fixed,
                        per_delay_s=per_delay, sync_wait_s=max(0.0, float(np.mean(sync))))


def _line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares (intercept, slope), both clipped at 0 (noise can tip either below)."""
    slope, intercept = np.polyfit(x, y, 1)
    if slope < 0:
        return max(0.0, float(np.mean(y))), 0.0
    if intercept < 0:
        return 0.0, max(0.0, float((x @ y) / (x @ x)))
    return float(intercept), float(slope)
