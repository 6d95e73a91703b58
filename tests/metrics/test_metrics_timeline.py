"""timeline.json: valid Chrome trace events (required keys, one track per rank, every track
sorted and properly nested) for simulations and emulations; exact spans, bubbles, the size
cap, and the RunWriter hook."""

from __future__ import annotations

import json

import numpy as np
import pytest

from emulator.build import build_run
from emulator.config import build_config
from emulator.metrics.io import RunWriter, read_run
from emulator.metrics.records import CollectiveRecords, StepRecords
from emulator.metrics.timeline import build_timeline, node_of_rank, write_timeline
from emulator.simulator.run import simulate
from emulator.specs import ParallelLayout
from emulator.trace.io import write_trace
from emulator.trace.synth import synth_trace

_META = {"process_name", "thread_name", "process_sort_index", "thread_sort_index"}


def check_trace_events(doc: dict) -> dict[tuple[int, int], list[dict]]:
    """Assert the Trace Event Format's JSON Object Format as Perfetto and chrome://tracing
    read it; return the X events of every (pid, tid) track in file order."""
    assert isinstance(doc["traceEvents"], list)
    json.loads(json.dumps(doc))  # strict JSON: no NaN or Infinity
    names: dict[tuple[str, int, int], str] = {}
    tracks: dict[tuple[int, int], list[dict]] = {}
    for ev in doc["traceEvents"]:
        assert ev["ph"] in ("X", "M", "C"), ev
        assert isinstance(ev["name"], str) and isinstance(ev["pid"], int), ev
        if ev["ph"] == "M":
            assert ev["name"] in _META and isinstance(ev["args"], dict), ev
            if ev["name"].endswith("_name"):
                names[(ev["name"], ev["pid"], ev.get("tid", 0))] = ev["args"]["name"]
        elif ev["ph"] == "X":
            assert isinstance(ev["tid"], int) and isinstance(ev["cat"], str), ev
            assert ev["ts"] >= 0 and ev["dur"] > 0, ev
            tracks.setdefault((ev["pid"], ev["tid"]), []).append(ev)
        else:
            assert ev["ts"] >= 0 and all(isinstance(v, int) for v in ev["args"].values()), ev
    for (pid, tid), events in tracks.items():
        assert ("process_name", pid, 0) in names and ("thread_name", pid, tid) in names
        stack: list[int] = []
        last = -1
        for ev in events:  # sorted by start; each span inside the one enclosing it
            start = round(ev["ts"] * 1000)
            end = start + round(ev["dur"] * 1000)
            assert start >= last, (pid, tid, ev)
            last = start
            while stack and stack[-1] <= start:
                stack.pop()
            assert not stack or end <= stack[-1], (pid, tid, ev)
            stack.append(end)
    return tracks


def _ns(x: float) -> int:
    return round(x * 1e9)


def _spans(events, cat):
    return [(round(e["ts"] * 1000), round(e["ts"] * 1000) + round(e["dur"] * 1000))
            for e in events if e["cat"] == cat]


@pytest.fixture(scope="module")
def batch_trace(tmp_path_factory):
    path = tmp_path_factory.mktemp("tl") / "batch.arrow"
    write_trace(synth_trace(num_requests=12, lengths="uniform", arrival="batch",
                            prompt_tokens=(10, 300), output_tokens=(3, 40), seed=3), path)
    return path


def _simulate(trace, outdir, writer=None, **kw):
    cfg = build_config(trace=trace, model="tiny", hardware="h100", max_num_batched_tokens=256,
                       **kw)
    tables = simulate(build_run(cfg))
    summary = RunWriter(outdir, **(writer or {})).finish(
        requests=tables.requests, steps=tables.steps, mode="simulate", config=cfg)
    return tables, summary


def test_simulation_timeline_is_valid_with_one_track_per_rank_and_exact_spans(batch_trace,
                                                                               tmp_path):
    tables, summary = _simulate(batch_trace, tmp_path, tp=2, pp=2)
    doc = json.loads((tmp_path / "timeline.json").read_text())
    tracks = check_trace_events(doc)
    threads = sorted(e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "thread_name")
    assert threads == ["rank 0 (dp0 pp0 tp0)", "rank 1 (dp0 pp0 tp1)", "rank 2 (dp0 pp1 tp0)",
                       "rank 3 (dp0 pp1 tp1)"]
    procs = [e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "process_name"]
    assert procs == ["node 0 (simulated, 8 GPUs)"]
    assert summary["timeline"] == {"file": "timeline.json", "num_events": len(doc["traceEvents"]),
                                   "num_steps_shown": tables.steps["step"].to_numpy().max() + 1,
                                   "num_steps_total": tables.steps["step"].to_numpy().max() + 1,
                                   "truncated": False}
    st = tables.steps.to_pydict()
    for rank, (stage, tid) in enumerate([(0, 1), (0, 2), (1, 3), (1, 4)]):
        rows = [i for i, s in enumerate(st["stage"]) if s == stage]
        events = tracks[(1, tid)]
        expect = sorted((_ns(st["start_s"][i]), _ns(st["end_s"][i])) for i in rows)
        assert _spans(events, "step") == expect
        # compute then modeled comm, exactly the stage row's totals
        compute = sorted((_ns(st["start_s"][i]), _ns(st["start_s"][i]) + _ns(st["compute_s"][i]))
                         for i in rows)
        assert _spans(events, "compute") == compute
        comm = sum(b - a for a, b in _spans(events, "comm.transfer"))
        assert abs(comm - sum(_ns(st["comm_s"][i]) for i in rows)) <= len(rows)
    # PP=2: stage 1 idles while stage 0 prefills the first micro-batch
    first = _spans(tracks[(1, 3)], "pp_bubble")[0]
    assert first[0] == 0 and first[1] == min(_ns(st["start_s"][i])
                                             for i, s in enumerate(st["stage"]) if s == 1)


def test_bubbles_and_pp_transfer_exact():
    # PP=2, TP=1: stage 0 busy [0,1] [1,2]; stage 1 starts when the activations arrived (1.0)
    steps = StepRecords()
    for step, stage, a, b in ((0, 0, 0.0, 1.0), (0, 1, 1.0, 2.0), (1, 0, 1.0, 2.0),
                              (1, 1, 2.0, 3.0)):
        steps.append(0, step, stage, a, b, 1, 0, 1, 0.5, 0.0, 1, 10)
    # step 0: rank 0 sends at [0.75, 1.0]; rank 1 waits in its recv from 0.5
    colls = CollectiveRecords()
    colls.extend(dict(replica=0, step=0, stage=np.array([0, 1]), layer=-1,
                      rank=np.array([0, 1]), axis="pp", op=np.array(["send", "recv"]),
                      group="pp/dp0/tp0/0>1", seq=0, bytes=64,
                      entry_s=np.array([0.75, 0.5]), exit_s=np.array([1.0, 1.0])))
    doc, info = build_timeline(steps.to_table(), colls.finalize(),
                               layout=ParallelLayout(pp=2), nodes=["a", "b"], mode="emulate")
    tracks = check_trace_events(doc)
    s = 10**9
    rank0, rank1 = tracks[(1, 1)], tracks[(2, 2)]
    assert _spans(rank0, "step") == [(0, s), (s, 2 * s)]
    assert _spans(rank0, "comm.sync_wait") == []
    assert _spans(rank0, "comm.transfer") == [(3 * s // 4, s)]
    # derived compute: the stage row minus the rank's collectives; step 1 has none
    assert _spans(rank0, "compute") == [(0, 3 * s // 4), (s, 3 * s // 2)]
    assert _spans(rank0, "pp_bubble") == [(2 * s, 3 * s)]
    # rank 1's step 0 starts at its recv entry (0.5): a bubble before it, none after
    assert _spans(rank1, "step") == [(s // 2, 2 * s), (2 * s, 3 * s)]
    assert _spans(rank1, "comm.sync_wait") == [(s // 2, 3 * s // 4)]
    assert _spans(rank1, "comm.transfer") == [(3 * s // 4, s)]
    assert _spans(rank1, "compute") == [(s, 2 * s), (2 * s, 5 * s // 2)]
    assert _spans(rank1, "pp_bubble") == [(0, s // 2)]
    assert [e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "process_name"] == \
        ["a", "b"]
    assert info.num_steps_shown == info.num_steps_total == 2 and not info.truncated


def test_overlapping_steps_of_a_rank_are_cut_so_the_track_nests():
    # TP=2: step 0 ends when the slow rank 1 ends (1.0); rank 0 enters step 1's all-reduce
    # at 0.95, before step 1's row starts (1.0)
    steps = StepRecords()
    steps.append(0, 0, 0, 0.0, 1.0, 1, 0, 1, 0.5, 0.3, 1, 10)
    steps.append(0, 1, 0, 1.0, 2.0, 1, 0, 1, 0.5, 0.3, 1, 10)
    colls = CollectiveRecords()
    for step, entry, exit_ in ((0, [0.5, 0.7], [0.8, 0.8]), (1, [0.95, 1.5], [1.75, 1.75])):
        colls.extend(dict(replica=0, step=step, stage=0, layer=0, rank=np.array([0, 1]),
                          axis="tp", op="all_reduce", group="tp/dp0/pp0", seq=0, bytes=8,
                          entry_s=np.array(entry), exit_s=np.array(exit_)))
    doc, _ = build_timeline(steps.to_table(), colls.finalize(), layout=ParallelLayout(tp=2),
                            nodes=["a", "a"], mode="emulate")
    rank0 = check_trace_events(doc)[(1, 1)]
    ms = 10**6
    assert _spans(rank0, "step") == [(0, 950 * ms), (950 * ms, 2000 * ms)]
    assert _spans(rank0, "comm.sync_wait") == [(500 * ms, 700 * ms), (950 * ms, 1500 * ms)]
    assert _spans(rank0, "compute") == [(0, 500 * ms), (800 * ms, 950 * ms),
                                        (1750 * ms, 2000 * ms)]


def test_cap_on_steps_and_events(batch_trace, tmp_path):
    tables, summary = _simulate(batch_trace, tmp_path, writer={"timeline_max_steps": 5})
    total = int(tables.steps["step"].to_numpy().max()) + 1
    assert total > 5
    doc = json.loads((tmp_path / "timeline.json").read_text())
    check_trace_events(doc)
    shown = {e["args"]["step"] for e in doc["traceEvents"] if e.get("cat") == "step"}
    assert shown == set(range(5))
    assert summary["timeline"]["truncated"] is True
    assert doc["otherData"]["num_steps_total"] == total
    # an event budget of 100 at 5 events per step (3 spans + 1 counter + 1 estimate slack)
    info = write_timeline(tmp_path, steps=tables.steps, collectives=None,
                          summary=read_run(tmp_path).summary, max_steps=None, max_events=100)
    assert info.num_steps_shown == 20 and info.truncated


def test_no_timeline_when_disabled_and_stale_one_removed(batch_trace, tmp_path):
    _simulate(batch_trace, tmp_path)
    assert (tmp_path / "timeline.json").exists()
    _, summary = _simulate(batch_trace, tmp_path, writer={"timeline": False})
    assert not (tmp_path / "timeline.json").exists() and summary["timeline"] is None


def test_nodes_of_ranks():
    layout = ParallelLayout(dp=2, tp=8)
    sim = node_of_rank({"config": {"hardware": "h100"}}, layout)
    assert sim[7] == "node 0 (simulated, 8 GPUs)" and sim[8] == "node 1 (simulated, 8 GPUs)"
    emu = node_of_rank({"nodes": {"rank_node_ip": ["10.0.0.1"] * 8 + ["10.0.0.2"] * 8}}, layout)
    assert emu[0] == "10.0.0.1" and emu[15] == "10.0.0.2"


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_emulation_timeline_is_valid_with_sync_wait_and_transfer(batch_trace, tmp_path,
                                                                ray_local):
    from emulator.runtime.executor import emulate

    cfg = build_config(trace=batch_trace, model="tiny", hardware="h100", tp=2, pp=2,
                       dilation=1.0, memory_scale=1e-3, timeout_s=10.0, max_requests=4,
                       max_output_tokens=4, max_num_batched_tokens=256)
    tables = emulate(build_run(cfg, record_slots=True))
    RunWriter(tmp_path).finish(requests=tables.requests, steps=tables.steps,
                               collectives=tables.collectives, mode="emulate", config=cfg,
                               nodes={"rank_node_ip": tables.extra.pop("nodes")})
    doc = json.loads((tmp_path / "timeline.json").read_text())
    tracks = check_trace_events(doc)
    assert len(tracks) == 4
    cats = {e["cat"] for events in tracks.values() for e in events}
    assert {"step", "compute", "comm.transfer", "comm.sync_wait"} <= cats
    names = {e["name"] for events in tracks.values() for e in events}
    assert {"tp all_reduce", "tp all_gather", "pp send", "pp recv"} <= names
    steps = read_run(tmp_path).steps
    assert {e["args"]["step"] for ev in tracks.values() for e in ev if e["cat"] == "step"} == \
        set(steps["step"].to_numpy().tolist())
