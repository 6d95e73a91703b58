"""The host-overhead model: the profile section, scaling to target units, the probe's
segment arithmetic, and the simulator's executor pricing a plan with it."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

from emulator.build import build_run
from emulator.calibrate.host import _segments
from emulator.config import build_config
from emulator.cost import CostModel
from emulator.cost.comm import CommEntry, CommProfile, HostOverhead
from emulator.cost.profile_io import load_profile, save_profile
from emulator.runtime.awake import HostMode
from emulator.simulator.engine import CostModelExecutor, Simulation
from emulator.trace.io import write_trace
from emulator.trace.synth import synth_trace

HOST = HostOverhead(num_ranks=2, step_gap_s=1e-3, step_gap_s_per_collective=1e-6,
                    step_fixed_s=2e-4, delay_grid_s=[0.0, 1e-3], delay_excess_s=[1e-5, 5e-5],
                    collective_excess_s=[1e-4, 3e-4], wake_s=[0.0, 2e-4])


def _profile(host=HOST) -> CommProfile:
    return CommProfile(name="h", host=host, entries=[
        CommEntry(op=op, group_size=2, placement="intra", alpha_s=1e-4, beta_s_per_byte=1e-9)
        for op in ("all_reduce", "all_gather", "all_to_all", "send_recv")])


def test_interpolation_and_scaling():
    assert HOST.delay_excess(np.array([0.0, 5e-4, 2e-3])) == pytest.approx([1e-5, 3e-5, 5e-5])
    assert HOST.collective_excess(5e-4) == pytest.approx(2e-4)
    scaled = _profile().scaled(0.1)
    h = scaled.host
    assert (h.step_gap_s, h.step_fixed_s) == pytest.approx((1e-4, 2e-5))
    assert h.delay_grid_s == pytest.approx([0.0, 1e-4])
    # Scaling the grid with the values keeps the curve's shape in target units.
    assert h.collective_excess(5e-5) == pytest.approx(2e-5)
    assert scaled.time_s("all_reduce", 2, "intra", 1e6) == pytest.approx(0.1 * (1e-4 + 1e-3))
    # Without a send/recv table the collective wake-up is used for pipeline transfers.
    assert HOST.p2p_wake(5e-4) == pytest.approx(1e-4)
    own = HOST.model_copy(update={"p2p_idle_grid_s": [0.0, 1e-3, 1e-1],
                                  "p2p_wake_s": [0.0, 4e-4, 4e-4]})
    assert own.p2p_wake(np.array([5e-4, 5e-2])) == pytest.approx([2e-4, 4e-4])
    assert own.scaled(0.5).p2p_wake(2.5e-4) == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="one value per p2p_idle_grid_s"):
        HostOverhead(**{**HOST.model_dump(), "p2p_idle_grid_s": [0.0], "p2p_wake_s": [0, 1]})
    with pytest.raises(ValueError, match="one value per delay_grid_s"):
        HostOverhead(num_ranks=2, step_gap_s=0, step_fixed_s=0, delay_grid_s=[0.0, 1.0],
                     delay_excess_s=[0.0], collective_excess_s=[0, 0], wake_s=[0, 0])
    with pytest.raises(ValueError, match="ascending"):
        HostOverhead(num_ranks=2, step_gap_s=0, step_fixed_s=0, delay_grid_s=[1.0, 0.0],
                     delay_excess_s=[0, 0], collective_excess_s=[0, 0], wake_s=[0, 0])


def test_profile_with_host_round_trips_and_old_files_load(tmp_path):
    path = tmp_path / "host.json"
    save_profile(_profile(), path)
    assert load_profile(path) == _profile()
    raw = json.loads(path.read_text())
    del raw["host"]  # a profile written before the section existed
    path.write_text(json.dumps(raw))
    assert load_profile(path).host is None


def test_probe_segments_exact():
    # Two ranks, three collectives each; delay 1 ms; line 100 us per collective.
    rec = lambda entry, exit_, comp: SimpleNamespace(  # noqa: E731
        coll_entry_s=np.array(entry), coll_exit_s=np.array(exit_),
        comp_start_s=np.array(comp[0]), comp_end_s=np.array(comp[1]))
    # rank 0's delays overshoot 20 us, rank 1's 50 us; the rest of a segment is the call
    r0 = rec([0.0010, 0.0023, 0.0036], [0.0012, 0.0025, 0.0038],
             ([0.0, 0.0012, 0.0025], [0.00102, 0.00222, 0.00352]))
    r1 = rec([0.0011, 0.0024, 0.0037], [0.0012, 0.0025, 0.0038],
             ([0.0, 0.0012, 0.0025], [0.00105, 0.00225, 0.00355]))
    seg, crit, transfer, sleep = _segments([r0, r1], 1e-3, np.full(3, 1e-4))
    # rank 0 leaves at 1.2 ms, enters at 2.3 ms: 0.1 ms over the delay; rank 1: 0.2 ms
    assert seg == pytest.approx(np.array([[1e-4, 1e-4], [2e-4, 2e-4]]))
    assert crit == pytest.approx([2e-4, 2e-4])  # 1.3 ms between exits - 1 ms - 0.1 ms
    assert transfer == pytest.approx([0.0, 0.0, 0.0])  # exits 0.1 ms after the last entry
    assert sleep == pytest.approx(np.array([[2e-5] * 3, [5e-5] * 3]))


@pytest.fixture(scope="module")
def batch_trace(tmp_path_factory):
    path = tmp_path_factory.mktemp("host") / "b.arrow"
    write_trace(synth_trace(num_requests=4, lengths="fixed", arrival="batch",
                            prompt_tokens=32, output_tokens=3, seed=0), path)
    return path


def _sim(trace, host, **kw):
    setup = build_run(build_config(trace=trace, model="tiny", hardware="h100", **kw))
    prof = _profile(host)
    setup.cost = CostModel(setup.model, setup.hardware, setup.layout, prof)
    req = setup.new_requests()
    sim = Simulation(req, setup.new_schedulers(req), setup.new_router(), setup.cost,
                     fast_forward=False)
    sim.executor = CostModelExecutor(setup.cost, req, host=host, clock=lambda: sim.now_s)
    sim.run()
    return sim.steps.to_table(), setup


def test_executor_adds_host_overheads_exactly(batch_trace):
    base, setup = _sim(batch_trace, None, tp=2)
    with_host, _ = _sim(batch_trace, HOST, tp=2)
    dur = lambda t: t["end_s"].to_numpy() - t["start_s"].to_numpy()  # noqa: E731
    # Per step: fixed + per delay (excess + collective excess): tp=2, every delay precedes
    # a TP collective. The tiny model's delays are far below 1 ms: interpolate each.
    assert (dur(with_host) > dur(base)).all()
    first = base.slice(0, 1).to_pylist()[0]
    assert first["num_prefill_tokens"] == 128
    starts = with_host["start_s"].to_numpy()
    ends = with_host["end_s"].to_numpy()
    # Every step after the first starts one round trip after the previous ended:
    # gap + rows * per-collective, rows = tp x (2 L + 2) collectives of the tiny model.
    rows = 2 * (2 * setup.model.num_layers + 2)
    assert starts[1:] - ends[:-1] == pytest.approx(np.full(len(starts) - 1, 1e-3 + rows * 1e-6))
    assert starts[0] == pytest.approx(1e-3 + rows * 1e-6)


def test_host_terms_of_one_stage():
    from emulator.calibrate.host import probe_work

    ex = CostModelExecutor(SimpleNamespace(tp=2, ep=1), None, host=HOST)
    gap, over = ex._host_terms(probe_work(2, 5e-4, 4096), 1)
    # 6 delays of 0.5 ms: excess 30 us each, collective excess 200 us each; 12 rows.
    assert over == pytest.approx([2e-4 + 6 * (3e-5 + 2e-4)])
    assert gap == pytest.approx(1e-3 + 12 * 1e-6)
    ex1 = CostModelExecutor(SimpleNamespace(tp=1, ep=1), None, host=HOST)
    _, over1 = ex1._host_terms(probe_work(2, 5e-4, 0), 1)
    assert over1 == pytest.approx([2e-4 + 6 * 3e-5])  # tp = 1: no collectives to wait in
    # EP: a dispatch and a combine per MoE layer, each right after another op (excess at 0).
    ex_ep = CostModelExecutor(SimpleNamespace(tp=2, ep=2, _num_moe=[2]), None, host=HOST)
    gap_ep, over_ep = ex_ep._host_terms(probe_work(2, 5e-4, 4096), 1)
    assert over_ep == pytest.approx(over + 4 * 1e-4)
    assert gap_ep == pytest.approx(gap + 2 * 4 * 1e-6)
    # The thermometer (mid-stage, back to back): the excess at 0 (100 us), plus what its own
    # curve, read at the middle layer's attention delay (0.5 ms: 60 us), adds over wake(0)
    therm = HOST.model_copy(update={"thermometer_wake_s": [2e-5, 1e-4]})
    for host, extra in ((HOST, 1e-4), (therm, 1e-4 + 6e-5)):
        ex_t = CostModelExecutor(SimpleNamespace(tp=2, ep=1), None, host=host)
        gap_t, got = ex_t._host_terms(probe_work(2, 5e-4, 4096, thermometer=True), 1)
        assert got == pytest.approx(over + extra)
        assert gap_t == pytest.approx(gap + 2 * 1e-6)
    # The call into a group collective: once per TP collective (6) and EP all-to-all (4);
    # a stage without collectives never pays it.
    call = HOST.model_copy(update={"collective_call_s": 7e-6})
    for tp, ep, num_calls, base in ((2, 1, 6, over), (2, 2, 10, over_ep), (1, 1, 0, over1)):
        ex = CostModelExecutor(SimpleNamespace(tp=tp, ep=ep, _num_moe=[2]), None, host=call)
        _, got = ex._host_terms(probe_work(2, 5e-4, 4096 if tp > 1 else 0), 1)
        assert got == pytest.approx(base + num_calls * 7e-6)
    assert call.scaled(0.5).collective_call_s == pytest.approx(3.5e-6)
    # The gap between delays that follow each other: 6 delays, 5 gaps, only where no
    # collective runs between them (tp = 1); scaled with the rest.
    gapped = HOST.model_copy(update={"delay_gap_s": 3e-6})
    for tp, base, num_gaps in ((1, over1, 5), (2, over, 0)):
        ex = CostModelExecutor(SimpleNamespace(tp=tp, ep=1), None, host=gapped)
        _, got = ex._host_terms(probe_work(2, 5e-4, 4096 if tp > 1 else 0), 1)
        assert got == pytest.approx(base + num_gaps * 3e-6)
    assert gapped.scaled(0.5).delay_gap_s == pytest.approx(1.5e-6)
    assert HOST.delay_gap_s == 0.0  # profiles written before it price no gap
    # The KV write: once per stage and step, with or without collectives; scaled too.
    written = HOST.model_copy(update={"kv_write_s": 1.3e-4})
    for tp, base in ((1, over1), (2, over)):
        ex = CostModelExecutor(SimpleNamespace(tp=tp, ep=1), None, host=written)
        _, got = ex._host_terms(probe_work(2, 5e-4, 4096 if tp > 1 else 0), 1)
        assert got == pytest.approx(base + 1.3e-4)
    assert written.scaled(0.5).kv_write_s == pytest.approx(6.5e-5)
    assert written.averaged(HOST).kv_write_s == pytest.approx(6.5e-5)
    assert HOST.kv_write_s == 0.0  # profiles written before it price no write
    # A pipeline without TP: each stage's own fixed time by role instead of step_fixed_s.
    staged = HOST.model_copy(update={"p2p_stage_fixed_s": [5e-5, 1.4e-5]})
    two = probe_work(2, 5e-4, 0)
    two.stages = [two.stages[0], two.stages[0]]
    _, got = CostModelExecutor(SimpleNamespace(tp=1, ep=1), None, host=staged)._host_terms(two, 2)
    # 5 delays a stage (the embedding on the first, the LM head on the last): 30 us each
    assert got == pytest.approx(np.array([5e-5, 1.4e-5]) + 5 * 3e-5)
    _, got = CostModelExecutor(SimpleNamespace(tp=2, ep=1), None, host=staged)._host_terms(
        probe_work(2, 5e-4, 4096), 1)
    assert got == pytest.approx(over)  # with TP (or one stage) step_fixed_s still
    assert staged.scaled(0.5).p2p_stage_fixed_s == pytest.approx([2.5e-5, 7e-6])
    with pytest.raises(ValueError, match="p2p_stage_fixed_s needs two values"):
        HostOverhead(**{**HOST.model_dump(), "p2p_stage_fixed_s": [1e-5]})


def test_pipeline_probe_arithmetic_exact():
    from emulator.calibrate.host import measure_pipeline_wake

    grid = (0.0, 1e-3, 1e-2)

    class Group:  # one transfer per plan: stage 1 recv, stage 0 send
        def submit_replica_step(self, replica, work, slots, dilation, step_key):
            return step_key

        def collect(self, key):
            _, sender_waits, d, _, _ = key
            # the side that waits enters d + 0.5 ms (the step boundary) before the other;
            # the transfer ends 100 us (line) + 20 or 50 us (wake) after the last entry
            first, last = 1.0, 1.0 + d + 5e-4
            exit_ = last + 1e-4 + (5e-5 if sender_waits else 2e-5)
            recs = []
            for rank, gap in ((0, 4e-6), (1, 6e-6)):  # rank 1's delays 6 us apart
                waits = (rank == 0) == sender_waits
                start = np.array([0.0, 1e-4 + gap, 2e-4 + 2 * gap])
                recs.append(SimpleNamespace(
                    coll_entry_s=np.array([first if waits else last]),
                    coll_exit_s=np.array([exit_]), comp_start_s=start,
                    comp_end_s=start + 1e-4, start_s=0.0, end_s=exit_))
            return recs

    got = measure_pipeline_wake(Group(), lambda op, b: 1e-4, grid_s=grid, num_steps=4)
    assert got["p2p_idle_grid_s"] == list(grid)
    assert got["p2p_recv_idle_s"] == pytest.approx([d + 5e-4 for d in grid])
    assert got["p2p_send_idle_s"] == pytest.approx([d + 5e-4 for d in grid])
    assert got["p2p_wake_s"] == pytest.approx([2e-5] * 3)
    assert got["p2p_send_wake_s"] == pytest.approx([5e-5] * 3)
    assert got["delay_gap_s"] == pytest.approx(5e-6)  # median of 4 and 6 us
    HostOverhead(**{**HOST.model_dump(), **got})  # a valid pipeline section


def test_pipeline_probe_sends_the_warm_message_first_only_when_asked():
    from emulator.calibrate.host import measure_pipeline_wake

    sent: list[int] = []

    class Group:  # one transfer per plan: 100 us line + 30 us, whatever the idle
        def submit_replica_step(self, replica, work, slots, dilation, step_key):
            sent.append(work.stages[0].pp_send_bytes)
            return step_key

        def collect(self, key):
            slow = key == ("p2p-warm",)  # a 1 s transfer, collected before the grid starts
            exit_ = 1.0 + 1e-4 + (1.0 if slow else 3e-5)
            return [SimpleNamespace(coll_entry_s=np.array([1.0]), coll_exit_s=np.array([exit_]),
                                    comp_start_s=np.array([0.0]), comp_end_s=np.array([1e-4]),
                                    start_s=0.0, end_s=exit_) for _ in range(2)]

    got = measure_pipeline_wake(Group(), lambda op, b: 1e-4, num_bytes=1000, grid_s=(0.0,),
                                num_steps=3, warm_bytes=8_000_000)
    assert sent[0] == 8_000_000 and set(sent[1:]) == {1000}
    assert got["p2p_wake_s"] == pytest.approx([3e-5])
    assert got["p2p_send_wake_s"] == pytest.approx([3e-5])
    sent.clear()
    measure_pipeline_wake(Group(), lambda op, b: 1e-4, num_bytes=1000, grid_s=(0.0,), num_steps=3)
    assert set(sent) == {1000}  # no warm message unless asked for


def test_pipeline_probe_prices_each_size_in_blocks():
    from emulator.calibrate.host import measure_pipeline_wake

    sent: list[int] = []

    class Group:  # wake-up 20 us + 1 us per KiB (receiver), twice that (sender)
        def submit_replica_step(self, replica, work, slots, dilation, step_key):
            sent.append(work.stages[0].pp_send_bytes)
            assert step_key[3] == work.stages[0].pp_send_bytes
            return step_key

        def collect(self, key):
            _, sender_waits, d, num_bytes, _ = key
            first, last = 1.0, 1.0 + d + num_bytes * 1e-9  # idle: d + 1 ns per byte
            wake = (2e-5 + num_bytes / 1024 * 1e-6) * (2 if sender_waits else 1)
            exit_ = last + num_bytes * 1e-8 + wake  # line: 10 ns per byte
            return [SimpleNamespace(
                coll_entry_s=np.array([first if (rank == 0) == sender_waits else last]),
                coll_exit_s=np.array([exit_]), comp_start_s=np.array([0.0]),
                comp_end_s=np.array([1e-4]), start_s=0.0, end_s=exit_) for rank in (0, 1)]

    grid = (0.0, 1e-2)
    got = measure_pipeline_wake(Group(), lambda op, b: b * 1e-8, num_bytes=2048, grid_s=grid,
                                num_steps=3, sizes=(4096, 1024, 2048))
    # per grid point and size, ascending: 2 warm-up plans, 3 measured, 1 in flight at the end
    assert sent == [b for _ in range(2 * len(grid)) for b in (1024, 2048, 4096) for _ in range(6)]
    assert [c.num_bytes for c in got["p2p_by_size"]] == [1024, 2048, 4096]
    for c in got["p2p_by_size"]:
        k = c.num_bytes / 1024
        assert c.wake_s == pytest.approx([2e-5 + k * 1e-6] * 2)
        assert c.send_wake_s == pytest.approx([4e-5 + 2 * k * 1e-6] * 2)
        assert c.recv_idle_s == pytest.approx([d + c.num_bytes * 1e-9 for d in grid])
    # the top-level curves are num_bytes'
    assert got["p2p_wake_s"] == pytest.approx([2.2e-5] * 2)
    assert got["p2p_send_idle_s"] == pytest.approx([d + 2048e-9 for d in grid])
    host = HostOverhead(**{**HOST.model_dump(), **got})
    assert host.p2p_wake(0.0, True, 3072) == pytest.approx(4e-5 + 6e-6)  # between sizes
    # one size: no per-size curves
    assert "p2p_by_size" not in measure_pipeline_wake(
        Group(), lambda op, b: b * 1e-8, num_bytes=2048, grid_s=grid, num_steps=3,
        sizes=(2048,))


def test_pipeline_wake_up_interpolated_by_transfer_size():
    from emulator.cost.comm import P2PWakeCurves

    def curves(num_bytes, recv, send):
        return P2PWakeCurves(num_bytes=num_bytes, wake_s=[0.0, recv], send_wake_s=[0.0, send],
                             recv_idle_s=[0.0, 10.0], send_idle_s=[0.0, 10.0])
    host = HOST.model_copy(update={
        "p2p_idle_grid_s": [0.0, 10.0], "p2p_wake_s": [0.0, 1.0], "p2p_send_wake_s": [0.0, 1.0],
        "p2p_by_size": [curves(1000, 1.0, 2.0), curves(2000, 3.0, 6.0)]})
    idle, waited = np.array([10.0, 10.0, 5.0, 10.0, 10.0]), np.array([0, 1, 1, 0, 1], bool)
    size = np.array([1000, 1500, 2000, 500, 9000])
    # flat outside the sizes probed, linear in bytes between them
    assert host.p2p_wake(idle, waited, size) == pytest.approx([1.0, 4.0, 3.0, 1.0, 6.0])
    assert host.p2p_wake(10.0, False) == pytest.approx(1.0)  # size unknown: the main curve
    half = host.scaled(0.5)  # times scaled, bytes not
    assert [c.num_bytes for c in half.p2p_by_size] == [1000, 2000]
    assert half.p2p_wake(5.0, True, 1500) == pytest.approx(2.0)
    other = host.model_copy(update={"p2p_by_size": [curves(1000, 3.0, 2.0),
                                                    curves(2000, 3.0, 6.0)]})
    assert host.averaged(other).p2p_by_size[0].wake_s == pytest.approx([0.0, 2.0])
    with pytest.raises(ValueError, match="same grids, sizes"):
        host.averaged(other.model_copy(update={"p2p_by_size": [curves(1000, 1.0, 1.0)]}))
    with pytest.raises(ValueError, match="strictly ascending in num_bytes"):
        HostOverhead(**{**host.model_dump(), "p2p_by_size": [
            curves(2000, 1, 1).model_dump(), curves(1000, 1, 1).model_dump()]})
    with pytest.raises(ValueError, match="one value per p2p_idle_grid_s"):
        HostOverhead(**{**host.model_dump(), "p2p_by_size": [
            {**curves(1000, 1, 1).model_dump(), "wake_s": [0.0]}]})
    with pytest.raises(ValueError, match="needs p2p_idle_grid_s"):
        HostOverhead(**{**HOST.model_dump(), "p2p_by_size": [curves(1000, 1, 1).model_dump()]})
    # the profile file keeps them
    assert HostOverhead.model_validate_json(host.model_dump_json()) == host


def test_pipeline_probe_with_a_template_measures_the_kv_write_apart_from_the_gaps():
    from emulator.calibrate.host import measure_pipeline_wake
    from emulator.core.work import StageWork, StepWork

    def stage(s, pre=0.0, post=0.0):
        return StageWork(stage=s, layer_ids=np.arange(2) + 2 * s, attn_compute_s=np.full(2, 1e-4),
                         mlp_compute_s=np.full(2, 1e-4), tp_allreduce_bytes=0,
                         pre_compute_s=pre, post_compute_s=post,
                         pp_send_bytes=0 if s else 4096)
    template = StepWork(stages=[stage(0, pre=1e-5), stage(1, post=1e-5)], num_tokens=24,
                        num_sampled_tokens=8)
    pre, attn, mlp, post = range(4)

    class Group:  # every gap 4 us, but the one after a stage's first attention: +120 us
        pool = None

        def allocate(self, weights, num_blocks, block_elems, scale, kv_block_size_tokens):
            self.pool = (num_blocks * kv_block_size_tokens, block_elems * scale
                         / kv_block_size_tokens)

        def submit_replica_step(self, replica, work, slots, dilation, step_key):
            assert list(slots) == list(range(24)) and self.pool == (32, 10)
            return step_key

        def collect(self, key):
            recs = []
            for stage, kinds in enumerate(((pre, attn, mlp, attn, mlp),
                                           (attn, mlp, attn, mlp, post))):
                kinds = np.array(kinds)
                first = int(np.flatnonzero(kinds == attn)[0])
                gaps = np.where(np.arange(4) == first, 4e-6 + 1.2e-4, 4e-6)
                start = np.r_[0.0, np.cumsum(1e-4 + gaps)]
                end = start + 1e-4
                if stage == 0:  # 20 us into the first delay, 30 us from the last to the send
                    entry, exit_, t0, t1 = end[-1] + 3e-5, end[-1] + 3e-4, -2e-5, end[-1] + 3e-4
                else:  # 10 us from the recv's end to the first delay, 4 us to the step's end
                    entry, exit_, t0, t1 = -1e-3, -1e-5, -1e-3, end[-1] + 4e-6
                recs.append(SimpleNamespace(
                    coll_entry_s=np.array([entry]), coll_exit_s=np.array([exit_]),
                    comp_start_s=start, comp_end_s=end, comp_kind=kinds, start_s=t0,
                    end_s=t1))
            return recs

    got = measure_pipeline_wake(Group(), lambda op, b: 1e-4, grid_s=(0.0, 1e-3), num_steps=3,
                                template=template, dilation=1.0, kv_row_elems=10)
    assert got["kv_write_s"] == pytest.approx(1.2e-4)
    assert got["delay_gap_s"] == pytest.approx(4e-6)  # the write kept out of the gaps
    assert got["p2p_stage_fixed_s"] == pytest.approx([5e-5, 1.4e-5])
    HostOverhead(**{**HOST.model_dump(), **got})  # a valid pipeline section


def test_pipeline_wake_up_curves_per_side():
    host = HOST.model_copy(update={"p2p_idle_grid_s": [0.0, 10.0], "p2p_wake_s": [0.0, 1.0],
                                   "p2p_send_wake_s": [0.0, 2.0]})
    assert host.p2p_wake(np.array([5.0, 5.0]), np.array([False, True])) == pytest.approx(
        [0.5, 1.0])
    assert host.scaled(0.5).p2p_wake(2.5, True) == pytest.approx(0.5)
    # a profile without the sender's curve prices both sides with the receiver's
    old = host.model_copy(update={"p2p_send_wake_s": None})
    assert old.p2p_wake(np.array([5.0, 5.0]), np.array([False, True])) == pytest.approx(
        [0.5, 0.5])
    with pytest.raises(ValueError, match="p2p_send_wake_s"):
        HostOverhead(**{**host.model_dump(), "p2p_send_wake_s": [0.0]})


def test_pipeline_wake_up_curves_placed_at_the_measured_idle_times():
    # The probe asked for idle times 0, 1 and 10 (the grid); the stages actually idled
    # 0.6, 0.4 and 9 (recv) and 2, 3, 12 (send): each curve is read at what was measured,
    # its points sorted by it.
    host = HOST.model_copy(update={
        "p2p_idle_grid_s": [0.0, 1.0, 10.0], "p2p_wake_s": [2.0, 1.0, 10.0],
        "p2p_send_wake_s": [0.0, 1.0, 10.0], "p2p_recv_idle_s": [0.6, 0.4, 9.0],
        "p2p_send_idle_s": [2.0, 3.0, 12.0]})
    assert host.p2p_wake(np.array([0.5, 9.0, 2.5, 7.5]),
                         np.array([False, False, True, True])) == pytest.approx(
        [1.5, 10.0, 0.5, 5.5])
    assert host.p2p_wake(0.0, False) == pytest.approx(1.0)  # flat below the first point
    half = host.scaled(0.5)
    assert half.p2p_recv_idle_s == pytest.approx([0.3, 0.2, 4.5])
    assert half.p2p_wake(0.25, False) == pytest.approx(0.75)
    other = host.model_copy(update={"p2p_recv_idle_s": [0.8, 0.6, 11.0]})
    assert host.averaged(other).p2p_recv_idle_s == pytest.approx([0.7, 0.5, 10.0])
    with pytest.raises(ValueError, match="p2p_send_idle_s needs one value"):
        HostOverhead(**{**host.model_dump(), "p2p_send_idle_s": [1.0]})
    # Without measured idle times the grid is the x (profiles written before them).
    plain = host.model_copy(update={"p2p_recv_idle_s": None, "p2p_send_idle_s": None})
    assert plain.p2p_wake(0.5, False) == pytest.approx(1.5)


def test_pipeline_probe_runs_the_runs_stage_program_with_the_idle_asked():
    from emulator.calibrate.host import pipeline_stages, with_idle
    from emulator.core.work import StageWork, StepWork

    def stage(s, n, attn, mlp, pre=0.0, post=0.0):
        return StageWork(stage=s, layer_ids=np.arange(n) + s * n, attn_compute_s=np.full(n, attn),
                         mlp_compute_s=np.full(n, mlp), tp_allreduce_bytes=4096,
                         pre_compute_s=pre, post_compute_s=post, embed_allreduce_bytes=4096,
                         pp_send_bytes=0 if s == 2 else 4096, probe_bytes=512)
    # three stages (the probe takes the first and the last), modelled seconds
    run = StepWork(stages=[stage(0, 4, 1e-4, 3e-4, pre=1e-5), stage(1, 4, 1e-4, 3e-4),
                           stage(2, 4, 1e-4, 3e-4, post=2e-4)], num_tokens=8,
                   num_sampled_tokens=8)
    # dilation 2: a layer is 0.8 ms of host time; 2 ms of busy time keeps 2 layers
    shape = pipeline_stages(run, 2.0, 1000, max_busy_s=2e-3)
    first, last = shape.stages
    assert [len(first.layer_ids), len(last.layer_ids)] == [2, 2]
    assert (first.pp_send_bytes, last.pp_send_bytes) == (1000, 0)
    assert (first.pre_compute_s, first.post_compute_s) == (1e-5, 0.0)
    assert (last.pre_compute_s, last.post_compute_s) == (0.0, 2e-4)
    for st in shape.stages:  # delays only: no TP collectives, no thermometer
        assert st.tp_allreduce_bytes == st.embed_allreduce_bytes == st.probe_bytes == 0
    # a slow run: one layer at least, the LM head cut to the budget too
    slow = pipeline_stages(run, 1000.0, 1000, max_busy_s=2e-3)
    assert len(slow.stages[0].layer_ids) == 1 and slow.stages[1].post_compute_s == 2e-6

    def busy(work, dilation):
        return [float(s.pre_compute_s + s.attn_compute_s.sum() + s.mlp_compute_s.sum()
                      + s.post_compute_s) * dilation for s in work.stages]
    # natural imbalance: stage 1 longer by the LM head (0.4 ms) less the embedding
    for idle in (0.0, 1e-4, 3e-3):
        recv = busy(with_idle(shape, 2.0, idle, sender_waits=False), 2.0)
        send = busy(with_idle(shape, 2.0, idle, sender_waits=True), 2.0)
        assert recv[0] - recv[1] == pytest.approx(idle)
        assert send[1] - send[0] == pytest.approx(idle)
    assert busy(shape, 2.0) == pytest.approx([1.62e-3, 2.0e-3])  # the shape untouched


def test_probe_re_measures_the_runs_all_gather_apart_from_the_overheads(monkeypatch):
    import emulator.calibrate.host as host_mod

    monkeypatch.setattr(host_mod, "measure_step_gap", lambda group, **kw: (1e-3, 0.0))
    line_ar, line_ag = 100e-6, 2e-3

    class Group:  # 17 all-reduces, then the all-gather: 10 us slower than back to back;
        world_size = 2  # the thermometer after the middle layer's first one: 30 us
        pool = None

        def allocate(self, weights, num_blocks, block_elems, scale, kv_block_size_tokens):
            self.pool = (num_blocks * kv_block_size_tokens, block_elems * scale
                         / kv_block_size_tokens)

        def run_replica_step(self, replica, work, slots, dilation, step_key):
            st = work.stages[0]
            d = float(st.attn_compute_s[0])
            durs = [line_ar + 1e-5] * 17 + [1.2 * line_ag + 1e-5]  # the all-gather 1.2x
            assert st.logits_gather_bytes == 4096 and st.tp_allreduce_bytes == 64
            assert st.probe_bytes == 64 and st.layer_ids.size == 8
            # the step writes its 40 KV rows (of 24 elements) into the pool
            assert list(slots) == list(range(40)) == list(range(work.num_tokens))
            assert self.pool == (48, 24)
            t, entry, exit_, comp, layer = 0.0, [], [], [], []
            for k, dur in enumerate(durs):
                if k == 1:  # the KV write, after the first layer's attention delay
                    t += 1.3e-4
                comp.append((t, t + d))
                entry.append(t + d)
                exit_.append(t + d + dur)
                layer.append((k - 1) // 2 if 0 < k < 17 else -1)
                t = exit_[-1]
                if k == 9:  # layer 4's first all-reduce: the thermometer, back to back
                    entry.append(t)
                    exit_.append(t + line_ar + 3e-5)
                    layer.append(-2)
                    t = exit_[-1]
            c = np.array(comp)
            return [SimpleNamespace(coll_entry_s=np.array(entry), coll_exit_s=np.array(exit_),
                                    coll_layer=np.array(layer), comp_start_s=c[:, 0],
                                    comp_end_s=c[:, 1], start_s=0.0, end_s=t)] * 2

    def line_s(op, num_bytes):
        assert num_bytes == (64 if op == "all_reduce" else 2 * 4096)
        return line_ar if op == "all_reduce" else line_ag

    grid = (0.0, 1e-3)
    got = host_mod.measure_host_overhead(Group(), line_s, num_steps=3, grid_s=grid,
                                         num_bytes=64, gather_bytes=4096, kv_rows=40,
                                         kv_row_elems=24)
    assert got.line_factors == {"all_gather": pytest.approx(1.2)}
    assert got.host.wake_s == pytest.approx([1e-5] * 2)
    # the all-gather's segment kept out of the mean (with it: (16 x 10 + 410) / 17 us),
    # and the first one, which holds the KV write, too
    assert got.host.collective_excess_s == pytest.approx([1e-5] * 2)
    assert got.host.collective_call_s == pytest.approx(0.0, abs=1e-12)
    assert got.host.kv_write_s == pytest.approx(1.3e-4)
    assert got.host.step_gap_s == 1e-3
    # the thermometer measured on its own, kept out of the rest
    assert got.host.thermometer_wake_s == pytest.approx([3e-5] * 2)


class _FakeEmulation:
    """Stands in for executor.Emulation in the gap probes; ``ran``: the setups it ran."""

    ran: list = []

    def __init__(self, setup, group):
        self.setup = setup

    def allocate(self):
        pass

    def run(self):
        self.ran.append(self.setup)


def test_step_gap_probe_runs_the_given_model_or_the_tiny_one(monkeypatch):
    import emulator.runtime.executor as executor
    from emulator.calibrate.host import measure_step_gap

    class Emulation(_FakeEmulation):  # steps 1 ms long; gap 2 ms + 10 us per collective row
        ran = []

        def tables(self):
            rows = 2 * (2 * self.setup.model.num_layers + 2)
            start = np.arange(5) * (1e-3 + 2e-3 + rows * 1e-5)
            steps = {"start_s": SimpleNamespace(to_numpy=lambda: start),
                     "end_s": SimpleNamespace(to_numpy=lambda: start + 1e-3)}
            return SimpleNamespace(steps=steps)

    monkeypatch.setattr(executor, "Emulation", Emulation)
    group = SimpleNamespace(world_size=2, timeout_s=5.0)
    assert measure_step_gap(group, model="llama-3.1-8b") == pytest.approx((2e-3, 1e-5))
    ran = [(st.model.name, st.model.num_layers) for st in Emulation.ran]
    assert ran == [("llama-3.1-8b", 4), ("llama-3.1-8b", 32)]
    Emulation.ran.clear()
    measure_step_gap(group, model="llama-3.1-405b")  # needs more than 2 ranks: tiny
    assert [st.model.name for st in Emulation.ran] == ["tiny", "tiny"]
    mode = HostMode(keep_awake="off", pin_ranks="off")
    measure_step_gap(group, model="llama-3.1-8b", host_mode=mode)
    assert {HostMode.of(st.config) for st in Emulation.ran[2:]} == {mode}


def test_pipeline_round_trips_skip_steps_that_waited_for_stage_0():
    from emulator.calibrate.host import pipeline_round_trips

    # Two micro-batches on two stages, steps 1 ms per stage.
    rows = [  # (micro_batch, step, stage, start, end), ms
        (0, 0, 0, 0.0, 1.0), (0, 0, 1, 1.0, 2.0),
        (1, 1, 0, 1.0, 2.0), (1, 1, 1, 2.0, 3.0),
        (0, 2, 0, 2.5, 3.5), (0, 2, 1, 3.5, 4.5),  # formed at 2.0, stage 0 free at 2.0: 0.5
        # formed at 3.0 but stage 0 busy with mb 0 until 3.5: waited, not a round trip
        (1, 3, 0, 3.5, 4.5), (1, 3, 1, 4.5, 5.5),
        (0, 4, 0, 5.2, 6.2), (0, 4, 1, 6.2, 7.2),  # formed at 4.5, stage 0 free at 4.5: 0.7
        # formed at 5.5, stage 0 busy until 6.2 but idle 0.8 ms before the start: 1.5
        (1, 5, 0, 7.0, 8.0), (1, 5, 1, 8.0, 9.0),
    ]
    mb, step, stage, start, end = (np.array(c) for c in zip(*rows))
    got = pipeline_round_trips(mb, step, stage, start * 1e-3, end * 1e-3)
    assert sorted(got.tolist()) == pytest.approx([0.5e-3, 0.7e-3, 1.5e-3])
    with pytest.raises(ValueError, match="no round trip"):
        pipeline_round_trips(mb[:4], step[:4], stage[:4], start[:4], end[:4])


def test_pipeline_gap_probe_runs_the_pipeline_of_the_given_model(monkeypatch):
    import emulator.runtime.executor as executor
    from emulator.calibrate.host import measure_pipeline_gap

    class Emulation(_FakeEmulation):  # two micro-batches, stages 1 and 2 ms, round trip 3 ms
        ran = []

        def tables(self):
            rows, free, formed = [], [0.0, 0.0], [-3e-3, -3e-3]
            for k in range(12):
                mb = k % 2
                t = max(formed[mb] + 3e-3, free[0])
                for stage, dur in ((0, 1e-3), (1, 2e-3)):
                    t = max(t, free[stage])
                    rows.append((mb, k, stage, t, t + dur))
                    free[stage] = t = t + dur
                formed[mb] = t
            cols = dict(zip(("micro_batch", "step", "stage", "start_s", "end_s"),
                            (np.array(c) for c in zip(*rows))))
            return SimpleNamespace(steps={k: SimpleNamespace(to_numpy=lambda v=v: v)
                                          for k, v in cols.items()},
                                   extra={"control": {"driver_busy_s": 0.024,
                                                      "num_steps": 12}})

    monkeypatch.setattr(executor, "Emulation", Emulation)
    group = SimpleNamespace(world_size=2, timeout_s=5.0)
    # the mean over the pairs that found stage 0 free (which they are is tested above)
    # and the driver's busy time per step
    assert measure_pipeline_gap(group, model="llama-3.1-8b") == pytest.approx((3e-3, 2e-3))
    ran = Emulation.ran
    assert [(st.model.name, st.layout.pp) for st in ran] == [("llama-3.1-8b", 2)]
    measure_pipeline_gap(group, model="llama-3.1-405b")  # does not fit 2 stages: tiny
    assert (ran[-1].model.name, ran[-1].layout.pp) == ("tiny", 2)
    # the ranks wait as in the run to be priced (Emulation.allocate reads these fields)
    mode = HostMode(delay_mode="sleep", keep_awake="off", rank_priority="normal",
                    pin_ranks="on", driver_priority="normal")
    measure_pipeline_gap(group, model="llama-3.1-8b", host_mode=mode)
    assert HostMode.of(ran[-1].config) == mode
    assert HostMode.of(ran[0].config) == HostMode()  # none given: the defaults
