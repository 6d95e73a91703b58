"""validate's thermometer: probe instances told apart from the validated collectives, the
shift they measure, and profiles re-priced with it (exact arithmetic)."""

import numpy as np
import pyarrow as pa
import pytest

from emulator.cost.comm import CommEntry, CommProfile, HostOverhead, LinePiece
from emulator.metrics.records import CollectiveRecords
from emulator.validate.report import (collective_errors, collective_instances, read_thermometer,
                                      thermometer_shifts)


def _collectives() -> pa.Table:
    # TP: an all-reduce of 128 KiB (100 us), then the probe of 64 KiB back to back (80 us);
    # PP: the activations (60 us); the executor numbers transfers per direction (seq).
    rows = [  # rank, op, group, seq, layer, bytes, entry, exit
        (0, "all_reduce", "tp", 0, 0, 131072, 0.0, 100e-6),
        (1, "all_reduce", "tp", 0, 0, 131072, 0.0, 100e-6),
        (0, "all_reduce", "tp", 1, -2, 65536, 100e-6, 180e-6),
        (1, "all_reduce", "tp", 1, -2, 65536, 100e-6, 180e-6),
        (0, "send", "pp", 0, -1, 4096, 300e-6, 360e-6),
        (1, "recv", "pp", 0, -1, 4096, 300e-6, 360e-6)]
    names = ("rank", "op", "group", "seq", "layer", "bytes", "entry_s", "exit_s")
    cols = {k: [r[i] for r in rows] for i, k in enumerate(names)}
    n = len(rows)
    rec = CollectiveRecords()
    rec.extend({**{k: np.array(v, dtype=object if k in ("op", "group") else None)
                   for k, v in cols.items()},
                "replica": np.zeros(n, np.int64), "step": np.zeros(n, np.int64),
                "stage": np.zeros(n, np.int64),
                "axis": np.array(["tp"] * 4 + ["pp"] * 2, dtype=object)})
    return rec.finalize()


PROFILE = CommProfile(name="h", entries=[
    CommEntry(op=o, group_size=2, placement="intra", alpha_s=a, beta_s_per_byte=0.0)
    for o, a in (("all_reduce", 110e-6), ("all_gather", 60e-6), ("send_recv", 40e-6))])


def test_probes_measure_a_shift_and_are_not_validated():
    inst = collective_instances(_collectives())
    assert sorted(inst["is_probe"].tolist()) == [False, False, True]
    probes = read_thermometer(inst, PROFILE)
    assert list(probes) == ["all_reduce"]
    assert probes["all_reduce"]["shift_s"] == pytest.approx(-30e-6)  # 80 measured, 110 line
    assert probes["all_reduce"]["bytes"] == 65536 and probes["all_reduce"]["num_instances"] == 1
    errors = collective_errors(inst, PROFILE)
    by = {(r["op"], r["bucket"]): (r["num_instances"], r["median_error"]) for r in errors["by_op"]}
    assert by == {("all_reduce", "large"): (1, pytest.approx(0.1)),     # 110 vs 100
                  ("send_recv", "small"): (1, pytest.approx(-1 / 3))}  # 40 vs 60
    # Shifts in the profile's units (x dilation); the all-reduce probe stands for every
    # group collective (transfers keep their line).
    assert thermometer_shifts(probes, 2.0) == pytest.approx(
        {"all_reduce": -60e-6, "all_gather": -60e-6, "all_to_all": -60e-6})
    assert read_thermometer({**inst, "is_probe": np.zeros(3, bool)}, PROFILE) == {}


def test_lines_shifted_moves_every_call_of_the_named_ops_only():
    host = HostOverhead(num_ranks=2, step_gap_s=1e-3, step_fixed_s=0.0, delay_grid_s=[0.0],
                        delay_excess_s=[0.0], collective_excess_s=[0.0], wake_s=[0.0])
    # a steep measured segment: its line's intercept is negative, its times are not
    piece = CommEntry(op="all_reduce", group_size=4, placement="intra", alpha_s=10e-6,
                      beta_s_per_byte=1e-9, pieces=[LinePiece(from_bytes=1000, alpha_s=-50e-6,
                                                               slope_s_per_byte=1e-7)])
    prof = CommProfile(name="h", entries=[*PROFILE.entries, piece], host=host)
    shifted = prof.lines_shifted({"all_reduce": -30e-6, "send_recv": -50e-6}, name="x")
    assert shifted.name == "x" and shifted.host == host
    assert shifted.time_s("all_reduce", 2, "intra", 8) == pytest.approx(80e-6)
    assert shifted.time_s("send_recv", 2, "intra", 8) == 0.0  # clipped at 0
    assert shifted.time_s("all_gather", 2, "intra", 8) == pytest.approx(60e-6)
    assert shifted.time_s("all_reduce", 4, "intra", 500) == 0.0  # 10.5 - 30 us
    assert shifted.time_s("all_reduce", 4, "intra", 2000) == pytest.approx(120e-6)  # 150 - 30
    up = prof.lines_shifted({"all_reduce": 5e-6}).scaled(2.0)  # shifts scale with the units
    assert up.time_s("all_reduce", 4, "intra", 2000) == pytest.approx(2 * 155e-6)
    assert up.time_s("all_reduce", 4, "intra", 0) == 0.0  # 0 bytes costs nothing
    # re-priced with the probes' shift, the all-reduce is predicted at 80 us: -20%
    errors = collective_errors(collective_instances(_collectives()),
                               PROFILE.lines_shifted({"all_reduce": -30e-6}))
    assert errors["collective_median_error_large"] == pytest.approx(-0.2)


def test_lines_scaled_multiplies_the_named_ops_lines_only():
    piece = CommEntry(op="all_gather", group_size=2, placement="intra", alpha_s=10e-6,
                      beta_s_per_byte=1e-9, pieces=[LinePiece(from_bytes=1000, alpha_s=-50e-6,
                                                               slope_s_per_byte=1e-7)])
    prof = CommProfile(name="h", entries=[PROFILE.entries[0], piece])
    scaled = prof.lines_scaled({"all_gather": 0.5}, name="x")
    assert scaled.name == "x"
    assert scaled.time_s("all_gather", 2, "intra", 500) == pytest.approx(0.5 * 10.5e-6)
    assert scaled.time_s("all_gather", 2, "intra", 2000) == pytest.approx(0.5 * 150e-6)
    assert scaled.time_s("all_reduce", 2, "intra", 8) == pytest.approx(110e-6)
    assert prof.lines_scaled({}).entries == prof.entries
    with pytest.raises(ValueError, match="all_gather"):
        prof.lines_scaled({"all_gather": 0.0})


def test_driver_thermometer_is_the_runs_driver_time_per_step_over_the_probes():
    from emulator.validate.report import driver_thermometer

    host = HostOverhead(num_ranks=2, step_gap_s=4e-3, step_gap_driver_s=2e-3, step_fixed_s=0.0,
                        delay_grid_s=[0.0], delay_excess_s=[0.0], collective_excess_s=[0.0],
                        wake_s=[0.0])
    control = {"driver_busy_s": 0.3, "num_steps": 100}
    assert driver_thermometer(control, host) == pytest.approx(
        {"run_busy_per_step_s": 3e-3, "probe_busy_per_step_s": 2e-3, "factor": 1.5})
    # nothing to compare: no probe of the driver, no run record, no steps
    assert driver_thermometer(control, host.model_copy(update={"step_gap_driver_s": None})) \
        is None
    assert driver_thermometer(None, host) is None
    assert driver_thermometer({"driver_busy_s": 0.0, "num_steps": 0}, host) is None
    assert driver_thermometer(control, None) is None


def test_the_thermometer_is_priced_after_the_delay_before_the_call_it_follows():
    # all-reduces at 0 and, 500 us later, at 600 us; the probe right after the second
    rows = [  # rank, seq, layer, entry, exit
        (0, 0, 0, 0.0, 100e-6), (1, 0, 0, 0.0, 100e-6),
        (0, 1, 1, 600e-6, 700e-6), (1, 1, 1, 600e-6, 700e-6),
        (0, 2, -2, 700e-6, 780e-6), (1, 2, -2, 700e-6, 780e-6)]
    n = len(rows)
    rec = CollectiveRecords()
    rec.extend({"rank": np.array([r[0] for r in rows]), "seq": np.array([r[1] for r in rows]),
                "layer": np.array([r[2] for r in rows]),
                "entry_s": np.array([r[3] for r in rows]), "exit_s": np.array([r[4] for r in rows]),
                "op": np.array(["all_reduce"] * n, dtype=object),
                "group": np.array(["tp"] * n, dtype=object), "bytes": np.full(n, 65536),
                "replica": np.zeros(n, np.int64), "step": np.zeros(n, np.int64),
                "stage": np.zeros(n, np.int64), "axis": np.array(["tp"] * n, dtype=object)})
    inst = collective_instances(rec.finalize())
    order = np.argsort(inst["time_s"])  # probe (80 us), then the two 100 us calls
    assert inst["is_probe"][order].tolist() == [True, False, False]
    assert inst["prev_idle_before_s"][order[0]] == pytest.approx(500e-6)
    host = HostOverhead(num_ranks=2, step_gap_s=0.0, step_fixed_s=0.0,
                        delay_grid_s=[0.0, 1e-3], delay_excess_s=[0.0, 0.0],
                        collective_excess_s=[0.0, 0.0], wake_s=[5e-6, 5e-6],
                        thermometer_wake_s=[10e-6, 30e-6])
    prof = PROFILE.model_copy(update={"host": host})
    # predicted 110 + 20 us (the thermometer's own curve at 500 us), measured 80
    assert read_thermometer(inst, prof)["all_reduce"]["shift_s"] == pytest.approx(-50e-6)
    # a profile without the curve: the back-to-back wake-up, 5 us
    old = prof.model_copy(update={"host": host.model_copy(update={"thermometer_wake_s": None})})
    assert read_thermometer(inst, old)["all_reduce"]["shift_s"] == pytest.approx(-35e-6)
    assert host.scaled(0.5).thermometer_wake(250e-6) == pytest.approx(10e-6)
    with pytest.raises(ValueError, match="thermometer_wake_s needs one value"):
        HostOverhead(**{**host.model_dump(), "thermometer_wake_s": [0.0]})


def test_the_shift_is_the_median_of_each_probes_own_excess():
    # probes of their steps' sizes: 64 KiB against a 110 us line, 1 MiB against 200 us
    beta = 90e-6 / (1048576 - 65536)
    prof = CommProfile(name="h", entries=[CommEntry(
        op="all_reduce", group_size=2, placement="intra", alpha_s=110e-6 - 65536 * beta,
        beta_s_per_byte=beta)])
    rows = []
    for i, (size, t) in enumerate([(65536, 150e-6), (1048576, 180e-6), (1048576, 190e-6)]):
        start = i * 1e-3
        rows += [(r, i, -2, size, start, start + t) for r in (0, 1)]
    n = len(rows)
    rec = CollectiveRecords()
    rec.extend({"rank": np.array([r[0] for r in rows]), "seq": np.array([r[1] for r in rows]),
                "layer": np.array([r[2] for r in rows]), "bytes": np.array([r[3] for r in rows]),
                "entry_s": np.array([r[4] for r in rows]), "exit_s": np.array([r[5] for r in rows]),
                "op": np.array(["all_reduce"] * n, dtype=object),
                "group": np.array(["tp"] * n, dtype=object), "replica": np.zeros(n, np.int64),
                "step": np.zeros(n, np.int64), "stage": np.zeros(n, np.int64),
                "axis": np.array(["tp"] * n, dtype=object)})
    probe = read_thermometer(collective_instances(rec.finalize()), prof)["all_reduce"]
    # +40, -20, -10 us: median -10 (the medians' difference, 180 - 200, would say -20)
    assert probe["shift_s"] == pytest.approx(-10e-6)
    assert probe["measured_median_s"] == pytest.approx(180e-6)
    assert probe["predicted_median_s"] == pytest.approx(200e-6)
    assert probe["bytes"] == 1048576 and probe["num_instances"] == 3


def test_runs_recorded_with_a_thermometer_size_read_back():
    from emulator.config import RunConfig

    assert RunConfig.model_validate({"trace": "t.arrow", "thermometer_bytes": 4096}).thermometer
    assert not RunConfig.model_validate({"trace": "t.arrow", "thermometer_bytes": 0}).thermometer
    assert not RunConfig.model_validate({"trace": "t.arrow"}).thermometer
