"""The emulation loop end to end on a local Ray with gloo: the simulator's scheduler driven
in real time, plans executed by Worker actors.

Checked: the emulator forms exactly the plans the simulator forms (offline batch, so plan
contents do not depend on timing); per step and rank, TP=2 performs 2 all-reduces per layer
of tokens x hidden x 2 bytes, plus the embedding all-reduce and the logits all-gather; the
KV rows the workers hold equal the tokens the KV manager holds; PP sends activations stage
to stage, with the simulator's plans even when the driver finds both micro-batches done; DP replicas are independent; a skipped collective fails the run with the rank
named and the finished steps kept.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import ray

from emulator.build import build_run
from emulator.config import build_config
from emulator.errors import RunError
from emulator.runtime.awake import (DRIVER_RT_PRIORITY, DriverPriority, HostMode,
                                    cpus_available, realtime_allowed, spinners_for)
from emulator.runtime.cluster import WorkerGroup
from emulator.runtime.delay import REALTIME_SPIN_S, SPIN_S
from emulator.runtime.executor import Emulation
from emulator.runtime.worker import host_tcp_congestion
from emulator.simulator.run import simulate
from emulator.specs import get_model
from emulator.trace.io import write_trace
from emulator.trace.schema import Trace
from emulator.trace.synth import synth_trace

pytestmark = [pytest.mark.ray, pytest.mark.timeout(180)]

TINY = get_model("tiny")
STEP_COLUMNS = ("replica", "step", "stage", "num_requests", "num_prefill_tokens",
                "num_decode_tokens")


@pytest.fixture(scope="module")
def batch_trace(tmp_path_factory):
    path = tmp_path_factory.mktemp("emu") / "batch.arrow"
    write_trace(synth_trace(num_requests=8, lengths="uniform", arrival="batch",
                            prompt_tokens=(10, 60), output_tokens=(3, 12), seed=1), path)
    return path


def _setup(trace, **kw):
    cfg = build_config(trace=trace, model="tiny", hardware="h100", dilation=1.0,
                       memory_scale=1e-3, timeout_s=5.0, max_num_batched_tokens=256, **kw)
    return build_run(cfg, record_slots=True)


class CheckedEmulation(Emulation):
    """After every step, the KV rows written on each rank of the replica equal the tokens the
    KV manager holds for the running requests (pp == 1, one plan in flight at a time)."""

    kv_checks = 0

    def _complete(self, f):
        n = super()._complete(f)
        r = f.plan.replica
        self._release_freed_blocks(r)
        sched = self.schedulers[r]
        held = int(self.requests.num_computed_tokens[sched.running_requests()].sum())
        rows = self.group.kv_rows_in_use(self._replica_ranks(r))
        assert rows == [held] * len(rows)
        CheckedEmulation.kv_checks += 1
        return n


@pytest.fixture(scope="module")
def tp2_group(ray_local):
    layout = _setup_layout(tp=2)
    with WorkerGroup(layout, backend="gloo", timeout_s=5.0) as group:
        yield group


def _setup_layout(**kw):
    from emulator.specs import ParallelLayout
    return ParallelLayout(**kw)


def _run(setup, group, cls=Emulation):
    emu = cls(setup, group)
    emu.allocate()
    emu.run()
    return emu, emu.tables()


def _steps(table, columns=STEP_COLUMNS):
    return {c: table[c].to_numpy().tolist() for c in columns}


def test_tp2_plans_equal_simulator_and_collectives_are_exact(batch_trace, tp2_group):
    # one plan in flight at a time, so that the KV check after each step sees it alone
    setup = _setup(batch_trace, tp=2, run_ahead=False)
    emu, tables = _run(setup, tp2_group, CheckedEmulation)
    assert CheckedEmulation.kv_checks == tables.steps.num_rows > 0
    # gloo ranks with slept delays (kept awake) run at real-time priority where permitted
    rt = realtime_allowed()
    # ... and pinned to a CPU each where the host has one more for the driver
    cpus = sorted(os.sched_getaffinity(0))
    # ... and each reports the TCP congestion control its gloo sockets were created with
    assert tables.extra["host_mode"] == [
        {"spin_s": REALTIME_SPIN_S if rt else SPIN_S, "realtime": rt,
         "spinners": spinners_for(i, 2, cpus_available()),
         "cpu": cpus[i] if len(cpus) > 2 else None,
         "tcp_congestion": host_tcp_congestion()} for i in range(2)]
    # ... and so does the driver while the group lives (it shares their host)
    assert tables.extra["control"]["driver_realtime"] == rt == tp2_group.driver_realtime
    policy = os.sched_getscheduler(0) & ~getattr(os, "SCHED_RESET_ON_FORK", 0)
    assert policy == (os.SCHED_FIFO if rt else os.SCHED_OTHER)
    assert os.sched_getparam(0).sched_priority == (DRIVER_RT_PRIORITY if rt else 0)
    sim = simulate(_setup(batch_trace, tp=2))
    assert _steps(tables.steps) == _steps(sim.steps)
    assert not np.isnan(tables.requests["finish_s"].to_numpy()).any()

    col = tables.collectives
    h = TINY.hidden_size
    tokens = dict(zip(tables.steps["step"].to_numpy().tolist(),
                      (tables.steps["num_prefill_tokens"].to_numpy()
                       + tables.steps["num_decode_tokens"].to_numpy()).tolist()))
    step, rank, op, layer, nbytes = (col[c].to_numpy(zero_copy_only=False) for c in
                                     ("step", "rank", "op", "layer", "bytes"))
    for s, num_tokens in tokens.items():
        for rk in (0, 1):
            mine = (step == s) & (rank == rk)
            ar = mine & (op == "all_reduce")
            # 2 per decoder layer + 1 for the vocabulary-parallel embedding
            assert ar.sum() == 2 * TINY.num_layers + 1
            assert set(nbytes[ar].tolist()) == {num_tokens * h * 2}
            assert sorted(layer[ar & (layer >= 0)].tolist()) == sorted(
                list(range(TINY.num_layers)) * 2)
            assert (mine & (op == "all_gather")).sum() == 1  # logits for sampling
    # every all-reduce instance pairs both ranks: sync-wait and transfer are defined
    assert (col["transfer_s"].to_numpy() >= 0).all()


class AheadEmulation(Emulation):
    """Records, at each step's completion, whether its plan had been applied ahead and how
    many plans of the replica were in flight meanwhile."""

    seen: list = []

    def _complete(self, f):
        AheadEmulation.seen.append((f.applied is not None, len(self._inflight) + 1))
        return super()._complete(f)


@pytest.mark.parametrize("layout", [{"tp": 2}, {"pp": 2}])
def test_run_ahead_forms_the_same_plans_and_stamps_every_request(batch_trace, ray_local,
                                                                 layout):
    """Running ahead (every request of an offline batch arrived at once): with every slot
    of the replica in flight the oldest plan is applied before its step ends and the next
    one waits on the actors, yet the plans, the KV blocks in use and the requests' order of
    events are those of the synchronous loop and of the simulator, and the workers end
    with no KV rows held."""
    AheadEmulation.seen = []
    setup = _setup(batch_trace, **layout)
    with WorkerGroup(setup.layout, backend="gloo", timeout_s=5.0) as group:
        emu, ahead = _run(setup, group, AheadEmulation)
        _, sync = _run(_setup(batch_trace, run_ahead=False, **layout), group)
        emu._release_freed_blocks(0)
        assert group.kv_rows_in_use() == [0, 0]
    sim = simulate(_setup(batch_trace, **layout))
    columns = STEP_COLUMNS + ("kv_blocks_used",)
    assert _steps(ahead.steps, columns) == _steps(sync.steps, columns) \
        == _steps(sim.steps, columns)
    pp = setup.layout.pp
    applied = [a for a, _ in AheadEmulation.seen]
    assert len(applied) == ahead.steps.num_rows // pp
    if pp == 1:  # every plan went ahead of its step (the first as soon as submitted)
        assert all(applied)
    else:  # while both micro-batches had plans: most of them
        assert sum(applied) >= len(applied) // 2
    assert max(n for _, n in AheadEmulation.seen) == pp + 1  # one plan ahead at most
    req = {c: ahead.requests[c].to_numpy() for c in ("arrival_s", "first_token_s", "finish_s")}
    assert np.isfinite(req["finish_s"]).all()
    assert (req["arrival_s"] <= req["first_token_s"]).all()
    assert (req["first_token_s"] <= req["finish_s"]).all()
    # stamped with their steps' real ends (the last stage's), in the simulator's order
    ends = set(ahead.steps["end_s"].to_numpy().tolist())
    assert set(req["finish_s"].tolist()) <= ends
    order = np.argsort(req["finish_s"], kind="stable")
    assert (np.diff(sim.requests["finish_s"].to_numpy()[order]) >= 0).all()


@pytest.mark.parametrize("run_ahead", [False, True])
def test_skipped_collective_fails_naming_the_rank_and_keeps_finished_steps(batch_trace,
                                                                            ray_local,
                                                                            run_ahead):
    class Faulty(Emulation):
        def _complete(self, f):
            n = super()._complete(f)
            if self.stats.num_steps == 2:
                self.group.skip_next_collective(1)
            return n

    setup = _setup(batch_trace, tp=2, run_ahead=run_ahead)
    with WorkerGroup(setup.layout, backend="gloo", timeout_s=5.0) as group:  # left broken
        emu = Faulty(setup, group)
        emu.allocate()
        with pytest.raises(RunError, match=r"rank 1 .*did not enter"):
            emu.run()
        tables = emu.tables()
    # The finished steps are kept: two, and running ahead the third, which was under way
    # when the fault was armed (it lands in the first step submitted after it).
    assert tables.steps.num_rows == (3 if run_ahead else 2)
    # The requests' times are those of finished steps only (running ahead, the failed
    # step's plan had been applied, but its requests' times wait for its end).
    ends = set(tables.steps["end_s"].to_numpy().tolist())
    for column in ("first_token_s", "finish_s"):
        t = tables.requests[column].to_numpy()
        assert set(t[np.isfinite(t)].tolist()) <= ends
    assert np.isfinite(tables.requests["first_token_s"].to_numpy()).any()


class SlowDriver(Emulation):
    """Handles nothing until every plan in flight is done: the driver of a loaded host,
    which finds both micro-batches of a 2-stage pipeline finished at once."""

    def _wait_and_complete(self):
        refs = [ref for f in self._inflight for ref in f.pending.waiting]
        ray.wait(refs, num_returns=len(refs), timeout=5.0)
        return super()._wait_and_complete()


def test_pp2_sends_activations_stage_to_stage(batch_trace, ray_local):
    setup = _setup(batch_trace, pp=2)
    rt = realtime_allowed()
    held = DriverPriority.holds()  # another group of this module may hold the driver too
    with WorkerGroup(setup.layout, backend="gloo", timeout_s=5.0) as group:
        # the driver's priority is a setting of its own: normal here, the ranks real-time
        group.set_host_mode(HostMode(driver_priority="normal"))
        assert not group.driver_realtime and DriverPriority.holds() == held
        _, tables = _run(setup, group)  # allocate() sets the run's mode (auto)
        assert group.driver_realtime == rt and DriverPriority.holds() == held + rt
        # every block freed on the way (with the plans) and at the end: no row in use
        assert group.kv_rows_in_use() == [0, 0]
    assert DriverPriority.holds() == held  # released at teardown
    assert tables.extra["control"]["driver_realtime"] == rt
    col = tables.collectives
    op = col["op"].to_numpy(zero_copy_only=False)
    steps = tables.steps
    num_plans = int((steps["stage"].to_numpy() == 0).sum())
    assert (op == "send").sum() == (op == "recv").sum() == num_plans
    send = op == "send"
    tokens = {int(s): int(p + d) for s, p, d in zip(
        steps["step"].to_numpy(), steps["num_prefill_tokens"].to_numpy(),
        steps["num_decode_tokens"].to_numpy())}
    for s, b in zip(col["step"].to_numpy()[send], col["bytes"].to_numpy()[send]):
        assert b == tokens[int(s)] * TINY.hidden_size * 2
    assert set(col["rank"].to_numpy()[send].tolist()) == {0}
    assert set(col["rank"].to_numpy()[op == "recv"].tolist()) == {1}


def test_pp2_slow_driver_forms_the_simulators_plans(tmp_path, ray_local):
    # Two requests a micro-batch: a, b in slot 0 and c, d in slot 1 finish with their second
    # token. When slot 0's finish, the simulator plans slot 0 with c, d still running: each
    # slot's share of the 4 requests is 2, so slot 0 admits e and f. A driver that handled
    # both completions before planning would see share 1 (2 requests left) and admit e only.
    path = write_trace(Trace(request_id=np.array(list("abcdef"), dtype=object),
                             arrival_time_s=np.zeros(6), prompt_tokens=np.full(6, 16, np.int32),
                             output_tokens=np.array([2, 2, 2, 2, 5, 5], np.int32)),
                       tmp_path / "t.arrow")
    setup = _setup(path, pp=2, max_num_seqs=2)
    with WorkerGroup(setup.layout, backend="gloo", timeout_s=5.0) as group:
        _, tables = _run(setup, group, SlowDriver)
    columns = STEP_COLUMNS + ("micro_batch",)
    sim = simulate(_setup(path, pp=2, max_num_seqs=2))
    assert _steps(tables.steps, columns) == _steps(sim.steps, columns)


def test_dp2_runs_two_independent_replicas(batch_trace, ray_local):
    setup = _setup(batch_trace, dp=2, router="round_robin")
    with WorkerGroup(setup.layout, backend="gloo", timeout_s=5.0) as group:
        _, tables = _run(setup, group)
    replica = tables.requests["replica"].to_numpy()
    assert sorted(set(replica.tolist())) == [0, 1]
    assert set(tables.steps["replica"].to_numpy().tolist()) == {0, 1}
    assert tables.collectives.num_rows == 0  # tp = pp = 1: nothing crosses replicas


def test_tp2_pp2_on_four_ranks(batch_trace, ray_local):
    setup = _setup(batch_trace, tp=2, pp=2)
    with WorkerGroup(setup.layout, backend="gloo", timeout_s=5.0) as group:
        _, tables = _run(setup, group)
    assert not np.isnan(tables.requests["finish_s"].to_numpy()).any()
    col = tables.collectives
    assert sorted(set(col["rank"].to_numpy().tolist())) == [0, 1, 2, 3]
    op, rank = col["op"].to_numpy(zero_copy_only=False), col["rank"].to_numpy()
    assert set(rank[op == "send"].tolist()) == {0, 1}
    assert set(rank[op == "recv"].tolist()) == {2, 3}


def test_thermometer_probes_run_in_every_step(batch_trace, ray_local):
    # validate's thermometer: per step a repeat of each stage's middle layer's first
    # all-reduce over its TP group, right after it (same size); the transfers between
    # stages are unchanged.
    setup = _setup(batch_trace, tp=2, pp=2, thermometer=True)
    with WorkerGroup(setup.layout, backend="gloo", timeout_s=5.0) as group:
        _, tables = _run(setup, group)
    sim = simulate(_setup(batch_trace, tp=2, pp=2, thermometer=True))
    assert _steps(tables.steps) == _steps(sim.steps)
    col = tables.collectives
    c = {k: col[k].to_numpy(zero_copy_only=False) for k in ("op", "rank", "layer", "bytes",
                                                            "seq", "step")}
    probe = c["layer"] == -2
    num_steps = len(set(c["step"].tolist()))
    ar = probe & (c["op"] == "all_reduce")
    assert sorted(c["rank"][ar].tolist()) == sorted([0, 1, 2, 3] * num_steps)
    assert set(c["op"][probe].tolist()) == {"all_reduce"}
    # right after the stage's middle layer's first all-reduce (tiny: layers 0-1, 2-3; the
    # middle one of two is the second)
    first = {}
    for k in np.flatnonzero(np.isin(c["layer"], (1, 3)) & (c["op"] == "all_reduce")):
        key = (c["rank"][k], c["step"][k])
        first[key] = min(first.get(key, c["seq"][k]), c["seq"][k])
    assert [c["seq"][k] for k in np.flatnonzero(ar)] == [
        first[(c["rank"][k], c["step"][k])] + 1 for k in np.flatnonzero(ar)]
    # of the size of the all-reduce before it
    size = {(c["rank"][k], c["step"][k], c["seq"][k]): c["bytes"][k]
            for k in np.flatnonzero(c["op"] == "all_reduce")}
    assert [c["bytes"][k] for k in np.flatnonzero(ar)] == [
        size[(c["rank"][k], c["step"][k], c["seq"][k] - 1)] for k in np.flatnonzero(ar)]
    assert len(set(c["bytes"][ar].tolist())) > 1  # the steps' sizes differ
    assert (c["op"] == "send").sum() == (c["op"] == "recv").sum() == 2 * num_steps
