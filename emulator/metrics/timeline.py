"""``timeline.json``: a run's steps and collectives as Chrome trace events (the JSON Object
Format of the Trace Event Format, which Perfetto and chrome://tracing open).

Tracks. One *process* per node, one *thread* (track) per global rank, named ``rank R (dpD
ppP tpT)``. Nodes are the ranks' hosts from ``summary.json`` (``nodes``) in an emulation,
and ``rank // gpus_per_node`` of the target hardware in a simulation. Each DP replica also
gets counter tracks (KV blocks used, requests in the batch) on its first rank's node.

Spans on a rank's track (complete events, ``ph: "X"``, properly nested):

- ``step N`` (cat ``step``): the rank's part of step N of its replica; args hold the step row.
- inside it, ``compute`` (cat ``compute``) and communication. In an **emulation** every
  collective of the rank is split into ``sync-wait`` (cat ``comm.sync_wait``: from the rank's
  entry until the last member entered) and the transfer (cat ``comm.transfer``, named
  ``AXIS OP``, e.g. ``tp all_reduce``). The steps table has only per-stage compute, so the
  per-rank ``compute`` spans are *derived*: the parts of the stage's [start, end] not
  covered by one of the rank's collectives. A **simulation** has no per-rank rows and prices
  a stage's compute and communication as two totals, so each rank of a stage shows the
  stage row as ``compute`` then ``comm (modeled)`` (no sync-wait: the cost model has no
  stragglers); the real kernels interleave them layer by layer.
- ``bubble`` (cat ``pp_bubble``, PP only): the rank is idle while a rank of another stage of
  its replica is busy.

A rank's step span covers its stage row and its own collectives (a receiving stage's row
starts when the activations arrived, its recv started earlier). Where two consecutive step
spans of a rank overlap (the stage row ends when the *slowest* TP rank ended, while this
rank already entered its next step), the earlier span is cut at the later one's start;
any span that would still cross its parent's end is clipped, so every track nests.

Size cap. A timeline holds at most the first ``max_steps`` steps of every replica (step
counter < max_steps; default :data:`DEFAULT_MAX_STEPS`) and at most about ``max_events``
events (default :data:`DEFAULT_MAX_EVENTS`, ~25 MB): if the first ``max_steps`` steps would
need more, fewer steps are shown. ``otherData`` says how many steps were shown and whether
the timeline was truncated; the Parquet tables always hold the whole run.

Times: ``ts``/``dur`` are microseconds of target time (the tables' seconds x 1e6), computed
in integer nanoseconds so nesting survives rounding.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from emulator.atomic import write_text_atomic
from emulator.specs.layout import ParallelLayout

TIMELINE_FILE = "timeline.json"
DEFAULT_MAX_STEPS = 1000
DEFAULT_MAX_EVENTS = 200_000


@dataclass(frozen=True, slots=True)
class TimelineInfo:
    """What a timeline holds (also written into its ``otherData``)."""

    num_events: int
    num_steps_shown: int
    """Steps shown per replica: those with step counter < this."""
    num_steps_total: int
    """Steps of the longest replica in the run."""
    truncated: bool


# --- inputs from the summary ---------------------------------------------------------------
def layout_of(config: Mapping[str, Any], steps: pa.Table | None = None,
              collectives: pa.Table | None = None) -> ParallelLayout:
    """The run's layout from its config; degrees missing from the config (a hand-written
    summary) are inferred from the tables (replicas, stages, ranks)."""
    def seen(col: str, table: pa.Table | None = steps) -> int:
        if table is None or table.num_rows == 0:
            return 1
        return int(np.max(table.column(col).to_numpy())) + 1

    keys = ("dp", "tp", "pp", "ep", "attention_dp")
    given = {k: config[k] for k in keys if config.get(k) is not None}
    given.setdefault("dp", seen("replica"))
    given.setdefault("pp", seen("stage"))
    if "tp" not in given:
        given["tp"] = max(1, -(-seen("rank", collectives) // (given["dp"] * given["pp"])))
    return ParallelLayout(**given)


def node_of_rank(summary: Mapping[str, Any], layout: ParallelLayout) -> list[str]:
    """Node name of every rank: the emulation's recorded hosts, else (simulation) node
    ``rank // gpus_per_node`` of the target hardware."""
    world = layout.world_size
    nodes = summary.get("nodes") or {}
    ips = nodes.get("rank_node_ip") if isinstance(nodes, Mapping) else None
    if isinstance(ips, Sequence) and len(ips) == world:
        return [str(ip) for ip in ips]
    if isinstance(nodes, Mapping) and all(str(r) in nodes for r in range(world)):
        return [str(nodes[str(r)]) for r in range(world)]
    gpn = 8
    hardware = (summary.get("config") or {}).get("hardware")
    if hardware:
        from emulator.specs.hardware import HARDWARE_PRESETS
        spec = HARDWARE_PRESETS.get(str(hardware).lower())
        gpn = spec.gpus_per_node if spec is not None else gpn
    return [f"node {rank // gpn} (simulated, {gpn} GPUs)" for rank in range(world)]


# --- step selection under the size cap --------------------------------------------------------
def _num_steps_shown(steps: dict[str, np.ndarray], coll_step: np.ndarray | None, tp: int,
                     max_steps: int | None, max_events: int) -> int:
    """Largest k such that steps < k of every replica fit the event budget (at least 1)."""
    step = steps["step"]
    if step.size == 0:
        return 0
    n = int(step.max()) + 1
    limit = n if max_steps is None else min(n, max_steps)
    # Events per step id: per stage row, tp x (step + compute + comm) + one counter sample;
    # per collective row, sync-wait + transfer + a compute gap.
    est = np.bincount(step, minlength=n).astype(np.float64) * (3 * tp + 2)
    if coll_step is not None and coll_step.size:
        est += 3 * np.bincount(coll_step, minlength=n)[:n]
    k = int(np.searchsorted(np.cumsum(est), max_events, side="right"))
    return max(1, min(k, limit))


def _columns(table: pa.Table, names: Sequence[str]) -> dict[str, np.ndarray]:
    return {c: table.column(c).to_numpy(zero_copy_only=False) for c in names}


def _ns(seconds: np.ndarray | float) -> np.ndarray:
    return np.rint(np.asarray(seconds, dtype=np.float64) * 1e9).astype(np.int64)


# --- intervals (integer ns, half-open) ---------------------------------------------------------
def _union(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in sorted(spans):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        elif e > s:
            out.append((s, e))
    return out


def _intersect(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        s, e = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if e > s:
            out.append((s, e))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def _gaps(busy: list[tuple[int, int]], lo: int, hi: int) -> list[tuple[int, int]]:
    out, t = [], lo
    for s, e in busy:
        if s > t:
            out.append((t, min(s, hi)))
        t = max(t, e)
    if hi > t:
        out.append((t, hi))
    return [(s, e) for s, e in out if e > s]


# --- building --------------------------------------------------------------------------------
def build_timeline(steps: pa.Table, collectives: pa.Table | None, *,
                   layout: ParallelLayout, nodes: Sequence[str], mode: str = "simulate",
                   max_steps: int | None = DEFAULT_MAX_STEPS,
                   max_events: int = DEFAULT_MAX_EVENTS) -> tuple[dict[str, Any], TimelineInfo]:
    """The trace-event document of a run and what it holds (see the module docstring)."""
    st = _columns(steps, ("replica", "step", "stage", "start_s", "end_s", "num_requests",
                          "num_prefill_tokens", "num_decode_tokens", "compute_s", "comm_s",
                          "kv_blocks_used", "kv_blocks_total", "micro_batch"))
    co = None
    if collectives is not None and collectives.num_rows:
        co = _columns(collectives, ("replica", "step", "rank", "axis", "op", "layer", "bytes",
                                    "entry_s", "exit_s", "sync_wait_s"))
    shown = _num_steps_shown(st, None if co is None else co["step"], layout.tp, max_steps,
                             max_events)
    total = int(st["step"].max()) + 1 if st["step"].size else 0
    keep = st["step"] < shown
    st = {k: v[keep] for k, v in st.items()}
    if co is not None:
        keep_c = co["step"] < shown
        co = {k: v[keep_c] for k, v in co.items()}

    tracks: dict[int, list[list]] = {r: [] for r in range(layout.world_size)}
    _add_steps(tracks, st, co, layout)
    if layout.pp > 1:
        _add_bubbles(tracks, st, layout)
    node_names = list(dict.fromkeys(nodes))
    pid_of_rank = [node_names.index(n) + 1 for n in nodes]
    events = _metadata(layout, nodes, node_names, pid_of_rank)
    for rank, spans in tracks.items():
        events.extend(_emit(_nest(spans), pid_of_rank[rank], rank + 1))
    events.extend(_counters(st, layout, pid_of_rank))
    info = TimelineInfo(num_events=len(events), num_steps_shown=min(shown, total),
                        num_steps_total=total, truncated=shown < total)
    doc = {"traceEvents": events, "displayTimeUnit": "ms",
           "otherData": {"mode": mode, "layout": layout.model_dump(),
                         "time": "target seconds x 1e6 (us)", "max_steps": max_steps,
                         "max_events": max_events, **asdict(info)}}
    return doc, info


def _add_steps(tracks, st, co, layout: ParallelLayout) -> None:
    """Step spans with their compute and communication children, per rank."""
    start, end = _ns(st["start_s"]), _ns(st["end_s"])
    comp_end = np.minimum(start + _ns(st["compute_s"]), end)
    comm_end = np.minimum(comp_end + _ns(st["comm_s"]), end)
    by_rank_step: dict[tuple[int, int, int], list[int]] = {}
    if co is not None:
        entry, exit_ = _ns(co["entry_s"]), _ns(co["exit_s"])
        ready = np.minimum(entry + _ns(co["sync_wait_s"]), exit_)
        order = np.lexsort((entry, co["step"], co["replica"], co["rank"]))
        for i in order.tolist():
            key = (int(co["rank"][i]), int(co["replica"][i]), int(co["step"][i]))
            by_rank_step.setdefault(key, []).append(i)
    parents: dict[int, list[list]] = {r: [] for r in tracks}
    for i in range(st["step"].size):
        r, s, p = int(st["replica"][i]), int(st["step"][i]), int(st["stage"][i])
        args = {"replica": r, "step": s, "stage": p, "micro_batch": int(st["micro_batch"][i]),
                "num_requests": int(st["num_requests"][i]),
                "num_prefill_tokens": int(st["num_prefill_tokens"][i]),
                "num_decode_tokens": int(st["num_decode_tokens"][i]),
                "kv_blocks_used": int(st["kv_blocks_used"][i])}
        for t in range(layout.tp):
            rank = layout.rank_of(r, p, t)
            lo, hi = int(start[i]), int(end[i])
            rows = by_rank_step.get((rank, r, s))
            children: list[list] = []
            if rows:  # measured collectives: sync-wait + transfer, compute in the gaps
                busy = []
                for j in rows:
                    e0, e1, e2 = int(entry[j]), int(ready[j]), int(exit_[j])
                    name = f"{co['axis'][j]} {co['op'][j]}"
                    children.append([e0, e1, "sync-wait", "comm.sync_wait",
                                     {"op": name}])
                    children.append([e1, e2, name, "comm.transfer",
                                     {"bytes": int(co["bytes"][j]), "layer": int(co["layer"][j])}])
                    busy.append((e0, e2))
                children.extend([a, b, "compute", "compute", None]
                                for a, b in _gaps(_union(busy), lo, hi))
                lo = min(lo, int(entry[rows].min()))
                hi = max(hi, int(exit_[rows].max()))
            else:  # stage totals: compute, then the modeled communication
                children.append([lo, int(comp_end[i]), "compute", "compute", None])
                children.append([int(comp_end[i]), int(comm_end[i]), "comm (modeled)",
                                 "comm.transfer", None])
            parents[rank].append([lo, hi, f"step {s}", "step", args, children])
    for rank, plist in parents.items():
        plist.sort(key=lambda x: (x[0], x[1]))
        for a, b in zip(plist, plist[1:]):
            if b[0] < a[1]:  # cut at the next step's start (see the module docstring)
                a[1] = max(a[0], b[0])
        for p in plist:
            tracks[rank].append(p[:5])
            tracks[rank].extend([max(c[0], p[0]), min(c[1], p[1]), *c[2:]] for c in p[5])


def _add_bubbles(tracks, st, layout: ParallelLayout) -> None:
    """Idle spans of each rank while a rank of another stage of its replica is busy."""
    start, end = _ns(st["start_s"]), _ns(st["end_s"])
    for r in range(layout.dp):
        sel = st["replica"] == r
        if not sel.any():
            continue
        stage_busy = {p: _union(list(zip(start[sel & (st["stage"] == p)].tolist(),
                                          end[sel & (st["stage"] == p)].tolist())))
                      for p in range(layout.pp)}
        lo, hi = int(start[sel].min()), int(end[sel].max())
        for p in range(layout.pp):
            others = _union([x for q, spans in stage_busy.items() if q != p for x in spans])
            for t in range(layout.tp):
                rank = layout.rank_of(r, p, t)
                own = _union([(a, b) for a, b, _, cat, _ in tracks[rank] if cat == "step"])
                for a, b in _intersect(_gaps(own, lo, hi), others):
                    tracks[rank].append([a, b, "bubble", "pp_bubble", None])


def _nest(spans: list[list]) -> list[list]:
    """Sort by (start, -duration) and clip any span crossing its enclosing span's end."""
    spans = sorted((s for s in spans if s[1] > s[0]), key=lambda x: (x[0], x[0] - x[1]))
    out, stack = [], []
    for span in spans:
        while stack and stack[-1] <= span[0]:
            stack.pop()
        if stack and span[1] > stack[-1]:
            span = [span[0], stack[-1], *span[2:]]
            if span[1] <= span[0]:
                continue
        stack.append(span[1])
        out.append(span)
    return out


def _emit(spans: list[list], pid: int, tid: int) -> list[dict[str, Any]]:
    events = []
    for a, b, name, cat, args in spans:
        ev = {"name": name, "cat": cat, "ph": "X", "ts": a / 1000, "dur": (b - a) / 1000,
              "pid": pid, "tid": tid}
        if args:
            ev["args"] = args
        events.append(ev)
    return events


def _metadata(layout, nodes, node_names, pid_of_rank) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    for i, name in enumerate(node_names):
        events.append({"name": "process_name", "ph": "M", "pid": i + 1, "tid": 0,
                       "args": {"name": name}})
        events.append({"name": "process_sort_index", "ph": "M", "pid": i + 1, "tid": 0,
                       "args": {"sort_index": i}})
    for rank in range(layout.world_size):
        d, p, t = layout.rank_coords(rank)
        events.append({"name": "thread_name", "ph": "M", "pid": pid_of_rank[rank],
                       "tid": rank + 1, "args": {"name": f"rank {rank} (dp{d} pp{p} tp{t})"}})
        events.append({"name": "thread_sort_index", "ph": "M", "pid": pid_of_rank[rank],
                       "tid": rank + 1, "args": {"sort_index": rank}})
    return events


def _counters(st, layout: ParallelLayout, pid_of_rank) -> list[dict[str, Any]]:
    """KV blocks used and requests in the batch of every replica, sampled at stage 0."""
    events = []
    first = st["stage"] == 0
    for i in np.flatnonzero(first).tolist():
        r = int(st["replica"][i])
        pid = pid_of_rank[layout.rank_of(r, 0, 0)]
        ts = int(_ns(st["start_s"][i])) / 1000
        events.append({"name": f"replica {r}", "ph": "C", "ts": ts, "pid": pid,
                       "args": {"kv_blocks_used": int(st["kv_blocks_used"][i]),
                                "num_requests": int(st["num_requests"][i])}})
    return events


# --- writing ---------------------------------------------------------------------------------
def write_timeline(outdir: str | Path, *, steps: pa.Table, collectives: pa.Table | None,
                   summary: Mapping[str, Any], max_steps: int | None = DEFAULT_MAX_STEPS,
                   max_events: int = DEFAULT_MAX_EVENTS) -> TimelineInfo:
    """Write ``outdir/timeline.json`` atomically for a run with this ``summary``."""
    layout = layout_of(summary.get("config") or {}, steps, collectives)
    doc, info = build_timeline(steps, collectives, layout=layout,
                               nodes=node_of_rank(summary, layout),
                               mode=str(summary.get("mode", "simulate")), max_steps=max_steps,
                               max_events=max_events)
    write_text_atomic(Path(outdir) / TIMELINE_FILE, json.dumps(doc, separators=(",", ":")))
    return info
