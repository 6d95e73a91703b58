"""Errors of the simulator's predictions against an emulation (pure: numpy and Arrow).

Every error is signed, ``(predicted - measured) / measured`` (0.05 = the simulator is 5%
high), so bias shows; headlines and the verdict use magnitudes.

- Steps: per step kind (prefill = any prompt tokens, else decode) and batch-size bucket
  (requests 1, 2-3, 4-7, ...), the error of the median step time; overall, over all joined
  rows (a row is one stage of one step: ``end - start``), the median of the rows' errors
  (:func:`median_paired_error`: the rows mix kinds and batch sizes, and the error of the
  two medians, kept as ``step_time_error_of_medians``, compares whichever rows each median
  lands on: TP=2 at dilation 2, +16.2% against +7.3% paired, its decode buckets -8.9% to
  +13.6%).
- Noise floor: the mean absolute deviation of measured step times from the median of steps
  with the *same plan shape* (stage, requests, prefill and decode tokens), over shapes seen
  at least 3 times, as a fraction of that median. Identical steps differ only by host noise,
  so no predictor's per-step error can go below it; it is printed beside the per-step MAPE.
- Collectives: per op and size bucket (< 64 KiB, >= 64 KiB), the error of the median time:
  the median over the emulated instances of each one's error against the host profile's
  prediction for it (op, group size, placement, bytes), which for instances of one size is
  the error of their median time and stays so where a bucket mixes sizes
  (:func:`median_paired_error`; the error of the bucket's two medians is kept beside as
  ``error_of_medians``). A measured instance's time is
  ``max(exit) - max(entry)`` over its ranks: the transfer once the last rank has entered;
  with a host profile the prediction adds the wake-up cost after the idle time before the
  instance (HostOverhead.wake): for a group collective the mean over its ranks of the time
  since the rank left its previous op (the compute delay it ran), for a pipeline transfer
  the time its first side waited in the op (the receiver in its recv, or the sender in its
  send until the receiver posted the recv: HostOverhead.p2p_wake with sender_waited).
  Those are the measured *context* of the transfer, not its outcome; the step-level errors
  use no measured input at all. The headline per bucket is the largest magnitude over ops;
  the mean straggler wait is reported beside.
- Thermometer: probe instances (layer -2, StageWork.probe_bytes) are not validated; their
  median against its prediction gives the shift per call that `validate` re-prices the
  group collectives with (:func:`read_thermometer`). The driver's busy time per step in the
  run against the gap probe's scales the gap between steps (:func:`driver_thermometer`).
- Requests: TTFT, TPOT and E2E at p50 and p90; the drain time (last finish - first arrival).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from emulator.cost.comm import CommProfile
from emulator.metrics.instances import instance_ids
from emulator.metrics.summary import compute_metrics
from emulator.runtime.records import PROBE_LAYER

LARGE_BYTES = 64 * 1024
MIN_SHAPE_REPEATS = 3


def rel_error(predicted: float, measured: float) -> float | None:
    if measured is None or predicted is None or not np.isfinite(measured) or measured <= 0:
        return None
    return float((predicted - measured) / measured)


def batch_bucket(num_requests: np.ndarray) -> np.ndarray:
    """Label per row: '1', '2-3', '4-7', ... (powers of two)."""
    lo = 2 ** np.floor(np.log2(np.maximum(num_requests, 1))).astype(np.int64)
    return np.array([str(a) if a == 1 else f"{a}-{2 * a - 1}" for a in lo.tolist()], dtype=object)


def step_errors(joined: dict[str, np.ndarray]) -> dict[str, Any]:
    meas, pred = joined["measured_s"], joined["predicted_s"]
    kind = np.where(joined["num_prefill_tokens"] > 0, "prefill", "decode")
    bucket = batch_bucket(joined["num_requests"])
    groups = []
    for k in ("prefill", "decode"):
        for b in sorted(set(bucket[kind == k].tolist()), key=lambda s: int(s.split("-")[0])):
            sel = (kind == k) & (bucket == b)
            groups.append({"kind": k, "batch": b, "num_steps": int(sel.sum()),
                           "measured_median_s": float(np.median(meas[sel])),
                           "predicted_median_s": float(np.median(pred[sel])),
                           "median_error": rel_error(np.median(pred[sel]), np.median(meas[sel]))})
    per_step = (pred - meas) / meas
    return {"step_time_median_error": median_paired_error(pred, meas),
            "step_time_error_of_medians": rel_error(np.median(pred), np.median(meas)),
            "step_time_mape": float(np.mean(np.abs(per_step))),
            "step_time_bias": float(np.mean(per_step)),
            "num_steps": int(meas.size), "by_kind": groups}


def noise_floor(joined: dict[str, np.ndarray]) -> dict[str, Any]:
    """MAPE of measured steps against the median of their plan shape (module docstring)."""
    shape = np.stack([joined[k] for k in ("stage", "num_requests", "num_prefill_tokens",
                                          "num_decode_tokens")], axis=1)
    _, inv, counts = np.unique(shape, axis=0, return_inverse=True, return_counts=True)
    inv = inv.ravel()
    dev = []
    for g in np.flatnonzero(counts >= MIN_SHAPE_REPEATS):
        t = joined["measured_s"][inv == g]
        dev.append(np.abs(t - np.median(t)) / np.median(t))
    if not dev:
        return {"noise_floor_mape": None, "noise_floor_num_steps": 0}
    d = np.concatenate(dev)
    return {"noise_floor_mape": float(d.mean()), "noise_floor_num_steps": int(d.size)}


def collective_instances(collectives: pa.Table, node_of_rank: list | None = None
                         ) -> dict[str, np.ndarray]:
    """One row per instance: op (send/recv -> send_recv), group size, placement, bytes (the
    cost model's convention: all_gather = gathered output), time_s, sync_wait_s."""
    c = {n: collectives[n].to_numpy(zero_copy_only=False) for n in (
        "replica", "step", "stage", "group", "seq", "op", "rank", "bytes", "entry_s",
        "exit_s", "layer")}
    ids = instance_ids(replica=c["replica"], step=c["step"], group=c["group"], seq=c["seq"])
    order = np.argsort(ids, kind="stable")
    ids_s = ids[order]
    starts = np.flatnonzero(np.r_[True, ids_s[1:] != ids_s[:-1]])
    size = np.diff(np.r_[starts, ids_s.size])
    entry, exit_ = c["entry_s"][order], c["exit_s"][order]
    max_entry = np.maximum.reduceat(entry, starts)
    time_s = np.maximum.reduceat(exit_, starts) - max_entry
    sync = np.add.reduceat(np.repeat(max_entry, size) - entry, starts) / size
    op = c["op"][order][starts].astype(str)
    op = np.where((op == "send") | (op == "recv"), "send_recv", op)
    nbytes = np.maximum.reduceat(c["bytes"][order], starts).astype(np.float64)
    nbytes = np.where(op == "all_gather", nbytes * size, nbytes)
    # The idle time before each instance (the context of its wake-up cost): for a pipeline
    # transfer how long its first side waited in the op for the other (the receiver for the
    # activations, or the sender for the receiver's recv); for a group collective the mean
    # over its ranks of (own entry - own exit of the previous op in the step), 0 for the first.
    row_op = c["op"][order]
    is_p2p = (row_op == "recv") | (row_op == "send")
    waited = np.repeat(max_entry, size) - entry  # 0 for the last side to enter
    gap = _gap_before(c["replica"], c["step"], c["rank"], c["entry_s"], c["exit_s"])[order]
    idle = np.where(is_p2p, waited, gap)
    p2p_idle = np.add.reduceat(np.where(is_p2p, idle, 0.0), starts)
    group_idle = np.add.reduceat(idle, starts) / size
    is_p2p_inst = np.add.reduceat(is_p2p.astype(np.int64), starts) > 0
    idle_before = np.where(is_p2p_inst, p2p_idle, group_idle)
    sender_waited = np.add.reduceat(np.where(row_op == "send", waited, 0.0), starts) > 0
    ranks = c["rank"][order]
    if node_of_rank:
        nodes = np.asarray(node_of_rank, dtype=object)[ranks]
        inter = np.array([len(set(nodes[s:s + k].tolist())) > 1 for s, k in zip(starts, size)])
    else:
        inter = np.zeros(starts.size, bool)
    replica, step = c["replica"][order][starts], c["step"][order][starts]
    group, seq = c["group"][order][starts], c["seq"][order][starts]
    return {"replica": replica, "step": step, "stage": c["stage"][order][starts],
            "op": op, "group_size": np.where(op == "send_recv", 2, size),
            "placement": np.where(inter, "inter", "intra"), "bytes": nbytes,
            "time_s": time_s, "sync_wait_s": sync, "idle_before_s": idle_before,
            "prev_idle_before_s": _previous_on_group(replica, step, group, seq, idle_before),
            "sender_waited": sender_waited,
            "is_probe": c["layer"][order][starts] == PROBE_LAYER}


def _previous_on_group(replica, step, group, seq, values) -> np.ndarray:
    """Per instance: ``values`` of the instance before it on its group in its step (seq - 1),
    0 for a group's first. The thermometer's wake-up depends on the delay before the
    collective it follows (HostOverhead.thermometer_wake)."""
    gid = np.unique(np.asarray(group, dtype=str), return_inverse=True)[1]
    order = np.lexsort((seq, gid, step, replica))
    same = np.zeros(order.size, bool)
    r, st, g, q = replica[order], step[order], gid[order], seq[order]
    same[1:] = (r[1:] == r[:-1]) & (st[1:] == st[:-1]) & (g[1:] == g[:-1]) & (q[1:] == q[:-1] + 1)
    v = np.asarray(values, dtype=np.float64)[order]
    out = np.empty(order.size)
    out[order] = np.where(same, np.r_[0.0, v[:-1]], 0.0)
    return out


def _gap_before(replica, step, rank, entry_s, exit_s) -> np.ndarray:
    """Per row: entry - exit of the same rank's previous op in (replica, step); 0 for the
    first op of a rank's step."""
    order = np.lexsort((entry_s, rank, step, replica))
    r, st, k = (np.asarray(a)[order] for a in (replica, step, rank))
    same = np.zeros(order.size, bool)
    same[1:] = (r[1:] == r[:-1]) & (st[1:] == st[:-1]) & (k[1:] == k[:-1])
    out = np.zeros(order.size)
    e, x = np.asarray(entry_s)[order], np.asarray(exit_s)[order]
    out[1:] = np.where(same[1:], e[1:] - x[:-1], 0.0)
    res = np.empty(order.size)
    res[order] = np.maximum(out, 0.0)
    return res


def _predicted(inst: dict[str, np.ndarray], profile: CommProfile
               ) -> tuple[np.ndarray, np.ndarray]:
    """Per instance (the benchmark line, the host's wake-up cost after the idle time before
    it: HostOverhead.wake / p2p_wake, for the thermometer thermometer_wake after the idle
    time before its predecessor; zeros without a host profile)."""
    line = np.array([profile.time_s(o, int(n), p, float(b)) for o, n, p, b in zip(
        inst["op"].tolist(), inst["group_size"].tolist(), inst["placement"].tolist(),
        inst["bytes"].tolist())])
    delay_s = inst.get("idle_before_s")
    if profile.host is None or delay_s is None:
        return line, np.zeros_like(line)
    p2p = inst["op"] == "send_recv"
    sender_waited = inst.get("sender_waited", np.zeros(p2p.size, bool))
    wake = profile.host.wake(delay_s)
    probe = inst.get("is_probe")
    if probe is not None and probe.any():  # the thermometer, after the delay before its
        prev = inst.get("prev_idle_before_s", np.zeros(p2p.size))  # predecessor
        wake = np.where(probe, profile.host.thermometer_wake(prev), wake)
    return line, np.where(p2p, profile.host.p2p_wake(delay_s, sender_waited, inst["bytes"]),
                          wake)


THERMOMETER_OPS = {"all_reduce": ("all_reduce", "all_gather", "all_to_all")}
"""Probe op -> the ops whose lines its measured speed re-prices (the group collectives)."""


def read_thermometer(inst: dict[str, np.ndarray], profile: CommProfile) -> dict[str, Any]:
    """What the run's thermometer probes (``is_probe`` instances: back-to-back repeats of
    a step's all-reduce, StageWork.probe_bytes) say about the host during the run, per probe
    op: instances, median bytes, measured and predicted median, and ``shift_s``, how much
    longer than predicted the probes took (the median over instances of measured -
    predicted, the tables' units: the probes have their steps' sizes). The host's
    slow and fast regimes differ by a cost per call (a collective right after a delay is
    slower than one back to back by about the same time in both), so the shift is added to
    every call of the ops it stands for (THERMOMETER_OPS), whatever their size."""
    probes = inst.get("is_probe")
    out: dict[str, Any] = {}
    if probes is None or not probes.any():
        return out
    line, wake = _predicted(inst, profile)
    for op in sorted(set(inst["op"][probes].tolist())):
        sel = probes & (inst["op"] == op)
        measured = inst["time_s"][sel]
        predicted = np.maximum(0.0, line[sel] + wake[sel])
        out[op] = {"num_instances": int(sel.sum()), "bytes": float(np.median(inst["bytes"][sel])),
                   "measured_median_s": float(np.median(measured)),
                   "predicted_median_s": float(np.median(predicted)),
                   "shift_s": float(np.median(measured - predicted))}
    return out


def thermometer_shifts(probes: dict[str, Any], scale: float = 1.0) -> dict[str, float]:
    """Per op the shift of its line (CommProfile.lines_shifted) from
    :func:`read_thermometer`'s output, times ``scale`` (the dilation: tables' units -> the
    profile's host seconds)."""
    return {op: probes[probe]["shift_s"] * scale for probe, ops in THERMOMETER_OPS.items()
            if probe in probes for op in ops}


def driver_thermometer(control: dict[str, Any] | None, host) -> dict[str, float] | None:
    """How fast the driver worked during the run against the probe of the gap between
    steps: ``factor`` = the run's driver busy time per step (``control``: the emulation's
    extra["control"]) / the probe's (HostOverhead.step_gap_driver_s); None when either is
    missing. The driver's work between a micro-batch's steps is most of the round trip at
    small dilations, and its speed moves with the host: over 41 PP=2 dilation-1 runs on the
    development VM, the round trip's mean followed the driver's busy time per step with a
    correlation of 0.94 (1.4-5.9 ms busy, 3.0-9.9 ms round trip; docs/results-validation.md,
    repeat 10), while probes just before and after the run missed it by up to 2x."""
    probe = None if host is None else host.step_gap_driver_s
    if not control or not probe or not control.get("num_steps"):
        return None
    run = float(control["driver_busy_s"]) / int(control["num_steps"])
    return {"run_busy_per_step_s": run, "probe_busy_per_step_s": float(probe),
            "factor": run / float(probe)}


def median_paired_error(predicted: np.ndarray, measured: np.ndarray) -> float | None:
    """The median over instances of each one's signed error, ``predicted_i / measured_i -
    1``. Where the instances share one prediction (one message size) it is the error of
    their median time (``p / m`` falls as ``m`` rises; exactly so for an odd count). Where
    a bucket mixes sizes it stays that, while the error of the bucket's two medians does
    not: with half the instances of one size and half of a larger one, the measured median
    falls among the fastest large and the slower small instances, the low tail of the large
    size's noise, against a prediction free of noise (TP=2 logits all-gathers, 24 of 8 MB
    among 48: +21.4% against +12.8% paired; docs/results-validation.md, repeat 11)."""
    ok = measured > 0
    if not ok.any():
        return None
    return float(np.median(predicted[ok] / measured[ok]) - 1.0)


def collective_errors(inst: dict[str, np.ndarray], profile: CommProfile) -> dict[str, Any]:
    """Per op and size bucket, the median of the instances' errors
    (:func:`median_paired_error`; the error of the two medians beside it as
    ``error_of_medians``; ``profile`` in the tables' units).
    The prediction of an instance is the benchmark line plus, with a host profile, the
    wake-up cost after the idle time before it (``idle_before_s``; HostOverhead.wake).
    Thermometer probes are left out (:func:`read_thermometer` reads them)."""
    line, wake = _predicted(inst, profile)
    pred = np.maximum(0.0, line + wake)
    keep = ~inst.get("is_probe", np.zeros(pred.size, bool))
    inst = {k: v[keep] for k, v in inst.items()}
    pred = pred[keep]
    rows, worst = [], {"small": None, "large": None}
    large = inst["bytes"] >= LARGE_BYTES
    for op in sorted(set(inst["op"].tolist())):
        for label, sel_size in (("small", ~large), ("large", large)):
            sel = (inst["op"] == op) & sel_size
            if not sel.any():
                continue
            meas_med, pred_med = np.median(inst["time_s"][sel]), np.median(pred[sel])
            err = median_paired_error(pred[sel], inst["time_s"][sel])
            rows.append({"op": op, "bucket": label, "num_instances": int(sel.sum()),
                         "num_sizes": int(np.unique(inst["bytes"][sel]).size),
                         "measured_median_s": float(meas_med),
                         "predicted_median_s": float(pred_med),
                         "median_error": err,
                         "error_of_medians": rel_error(pred_med, meas_med)})
            if err is not None and (worst[label] is None or abs(err) > abs(worst[label])):
                worst[label] = err
    group_ops = inst["op"] != "send_recv"
    measured_sync = float(np.mean(inst["sync_wait_s"][group_ops])) if group_ops.any() else None
    return {"collective_median_error_small": worst["small"],
            "collective_median_error_large": worst["large"], "by_op": rows,
            "sync_wait_measured_mean_s": measured_sync}


def request_errors(measured: pa.Table, predicted: pa.Table) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("ttft", "tpot", "e2e"):
        m = measured[f"{name}_s"].to_numpy()
        p = predicted[f"{name}_s"].to_numpy()
        for q in (50, 90):
            mv = m[np.isfinite(m)]
            pv = p[np.isfinite(p)]
            out[f"{name}_p{q}_error"] = (rel_error(np.percentile(pv, q), np.percentile(mv, q))
                                         if mv.size and pv.size else None)
    return out


def drain_error(measured_requests: pa.Table, measured_steps: pa.Table,
                predicted_requests: pa.Table, predicted_steps: pa.Table) -> dict[str, Any]:
    m = compute_metrics(measured_requests, measured_steps)["drain_time_s"]
    p = compute_metrics(predicted_requests, predicted_steps)["drain_time_s"]
    return {"drain_time_error": rel_error(p, m), "drain_time_measured_s": m,
            "drain_time_predicted_s": p}
