"""What limits a run, named from the run's own numbers.

Facts (all fractions in [0, 1], from the run's tables and summary):

- ``kv_peak_usage``, ``num_preemptions``: the summary metrics.
- ``comm_share``: communication over compute + communication, summed over the step rows
  (``comm_s`` includes sync-wait in an emulation; a simulation's rows hold TP/EP
  collectives, not the PP activation transfer).
- ``bubble_fraction`` (pp > 1): per replica, the busy time of its stages is compared with
  the union of their busy intervals U: ``sum_stages(|U| - busy_stage) / (pp * |U|)``, i.e.
  the share of stage-time inside the replica's busy periods that a stage sat idle while
  another stage worked. Summed over replicas before dividing.
- ``imbalance``: the larger of (a) DP request-routing imbalance, ``1 - mean_r(span_r) /
  max_r(span_r)`` with ``span_r`` = last step end of replica r - first step start of the
  run (replicas that finish early leave GPUs idle while the last one drains), and (b) MoE
  routing imbalance, the EP collectives' sync-wait per rank over the mean per-rank step
  time (emulation only: the simulator prices uniform routing without stragglers).
- ``compute_bound_share``: the share of compute time in steps whose roofline flops term
  exceeds its bytes term. Both terms are priced with the cost model's own layer functions
  (:mod:`emulator.cost.compute`) at infinite bandwidth and at infinite FLOP/s. The steps
  table has no per-request contexts, so a step's KV rows read are taken as
  ``kv_blocks_used * block_size``, decode (query, key) pairs as those rows times the decode
  share of the step's tokens, and prefill pairs as ``prefill_tokens^2 / (2 *
  prefill_requests)``: an approximation that decides the side of the roofline, not a time.

Rule (:func:`name_bottleneck`), first match wins:

1. ``KV capacity`` if any request was preempted or ``kv_peak_usage >= KV_PEAK``;
2. else the largest of ``communication`` (comm_share), ``pipeline bubbles``
   (bubble_fraction) and ``routing imbalance`` (imbalance), if it is at least ``MIN_LOSS``;
3. else ``compute`` if ``compute_bound_share >= 0.5``, otherwise ``memory bandwidth``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

KV_PEAK = 0.95
"""KV use at or above which the cache, not the GPUs, limits admission (vLLM preempts soon
after: a decode step needs a free block every block_size tokens per request)."""
MIN_LOSS = 0.20
"""A loss (communication, bubbles, imbalance) is named when it costs at least a fifth of the
busy time; below that, the kernels themselves (compute or memory) dominate."""

KV, COMPUTE, MEMORY = "KV capacity", "compute", "memory bandwidth"
COMM, BUBBLES, IMBALANCE = "communication", "pipeline bubbles", "routing imbalance"


@dataclass(frozen=True, slots=True)
class RunFacts:
    kv_peak_usage: float
    num_preemptions: int
    comm_share: float
    bubble_fraction: float
    imbalance: float
    compute_bound_share: float | None
    """None when the model/hardware could not be resolved from the config."""


def _col(t: pa.Table, name: str) -> np.ndarray:
    return t.column(name).to_numpy(zero_copy_only=False)


def _union_length(start: np.ndarray, end: np.ndarray) -> float:
    """Total length of the union of intervals [start, end)."""
    if start.size == 0:
        return 0.0
    order = np.argsort(start, kind="stable")
    s, run_end = start[order], np.maximum.accumulate(end[order])
    first = np.flatnonzero(np.r_[True, s[1:] > run_end[:-1]])  # where a merged run begins
    last_end = np.r_[run_end[first[1:] - 1], run_end[-1]]
    return float((last_end - s[first]).sum())


def bubble_fraction(steps: pa.Table) -> float:
    """Idle share of stage-time within each replica's busy periods (0 without PP)."""
    stage = _col(steps, "stage")
    if steps.num_rows == 0 or stage.max() == 0:
        return 0.0
    replica, start, end = _col(steps, "replica"), _col(steps, "start_s"), _col(steps, "end_s")
    pp = int(stage.max()) + 1
    idle = total = 0.0
    for r in np.unique(replica).tolist():
        sel = replica == r
        u = _union_length(start[sel], end[sel])
        busy = sum(_union_length(start[sel & (stage == p)], end[sel & (stage == p)])
                   for p in range(pp))
        idle += pp * u - busy
        total += pp * u
    return float(idle / total) if total > 0 else 0.0


def dp_imbalance(steps: pa.Table) -> float:
    replica = _col(steps, "replica")
    if steps.num_rows == 0 or replica.max() == 0:
        return 0.0
    t0 = float(_col(steps, "start_s").min())
    end = _col(steps, "end_s")
    spans = np.array([end[replica == r].max() - t0 for r in np.unique(replica)])
    return float(1.0 - spans.mean() / spans.max()) if spans.max() > 0 else 0.0


def ep_wait_fraction(steps: pa.Table, collectives: pa.Table | None) -> float:
    if collectives is None or collectives.num_rows == 0:
        return 0.0
    ep = _col(collectives, "axis") == "ep"
    if not ep.any():
        return 0.0
    ranks = _col(collectives, "rank")
    wait_per_rank = float(_col(collectives, "sync_wait_s")[ep].sum()) / len(np.unique(ranks[ep]))
    step_time = float((_col(steps, "end_s") - _col(steps, "start_s")).sum())
    pairs = _col(steps, "replica").astype(np.int64) * 1_000_000 + _col(steps, "stage")
    mean_stage_time = step_time / max(1, len(np.unique(pairs)))
    return min(1.0, wait_per_rank / mean_stage_time) if mean_stage_time > 0 else 0.0


def compute_bound_share(steps: pa.Table, config: Mapping[str, Any]) -> float | None:
    """Share of compute time in compute-bound steps (see the module docstring)."""
    from emulator.cost.compute import (RankShapes, Roofline, attention_time_s,
                                       dense_mlp_time_s, moe_time_s)
    from emulator.errors import UserError
    from emulator.specs import ParallelLayout, get_hardware, get_model

    try:
        model, hw = get_model(str(config["model"])), get_hardware(str(config["hardware"]))
        layout = ParallelLayout(**{k: config[k] for k in ("dp", "tp", "pp", "ep", "attention_dp")
                                   if k in config})
    except (KeyError, UserError, ValueError):
        return None
    if steps.num_rows == 0:
        return None
    shapes = RankShapes.of(model, layout.tp, layout.ep)
    block = int(config.get("block_size", 16))
    prefill = _col(steps, "num_prefill_tokens").astype(np.float64)
    decode = _col(steps, "num_decode_tokens").astype(np.float64)
    tokens = prefill + decode
    kv_rows = _col(steps, "kv_blocks_used").astype(np.float64) * block
    with np.errstate(divide="ignore", invalid="ignore"):
        decode_pairs = np.where(tokens > 0, kv_rows * decode / tokens, 0.0)
        num_prefill_req = np.maximum(1.0, _col(steps, "num_requests") - decode)
        prefill_pairs = prefill * prefill / (2.0 * num_prefill_req)
    terms = []
    for roof in (Roofline(hw.peak_flops_per_s * hw.mfu, math.inf, 0.0),
                 Roofline(math.inf, hw.hbm_bytes_per_s * hw.mbu, 0.0)):
        t = attention_time_s(shapes, roof, tokens, prefill_pairs, decode_pairs, 0.0, kv_rows)
        if model.is_moe:
            t = t + moe_time_s(shapes, roof, tokens, tokens, layout.ep)
        else:
            t = t + dense_mlp_time_s(shapes, roof, tokens)
        terms.append(np.asarray(t, dtype=np.float64))
    compute_s = _col(steps, "compute_s")
    total = float(compute_s.sum())
    if total <= 0:
        return None
    return float(compute_s[terms[0] > terms[1]].sum() / total)


def run_facts(steps: pa.Table, collectives: pa.Table | None,
              summary: Mapping[str, Any]) -> RunFacts:
    metrics = summary.get("metrics") or {}
    compute = float(_col(steps, "compute_s").sum()) if steps.num_rows else 0.0
    comm = float(_col(steps, "comm_s").sum()) if steps.num_rows else 0.0
    return RunFacts(
        kv_peak_usage=float(metrics.get("kv_peak_usage") or 0.0),
        num_preemptions=int(metrics.get("num_preemptions") or 0),
        comm_share=comm / (compute + comm) if compute + comm > 0 else 0.0,
        bubble_fraction=bubble_fraction(steps) if steps.num_rows else 0.0,
        imbalance=max(dp_imbalance(steps), ep_wait_fraction(steps, collectives))
        if steps.num_rows else 0.0,
        compute_bound_share=compute_bound_share(steps, summary.get("config") or {}))


def name_bottleneck(facts: RunFacts) -> str:
    """The named bottleneck of a run (rule in the module docstring)."""
    if facts.num_preemptions > 0 or facts.kv_peak_usage >= KV_PEAK:
        return KV
    losses = {COMM: facts.comm_share, BUBBLES: facts.bubble_fraction,
              IMBALANCE: facts.imbalance}
    name, value = max(losses.items(), key=lambda kv: kv[1])
    if value >= MIN_LOSS:
        return name
    return COMPUTE if (facts.compute_bound_share or 0.0) >= 0.5 else MEMORY
