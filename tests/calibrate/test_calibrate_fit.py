"""Alpha-beta fitting: exact recovery from synthetic points, constraints, the reduction
split, byte conventions and the benchmark summary's bus bandwidth."""

import numpy as np
import pyarrow as pa
import pytest

from emulator.calibrate.bench import (RAW_SCHEMA, iterations_for, parse_size, sizes_between,
                                      summarize)
from emulator.calibrate.fit import fit_line, fit_profile, isotonic, model_bytes
from emulator.cost.comm import CommEntry, LinePiece
from emulator.errors import ConfigError

SIZES = np.array([8, 64, 1024, 65536, 1 << 20, 64 << 20], dtype=np.float64)


@pytest.mark.parametrize("alpha, beta", [(3.1e-5, 1.2e-9), (2.5e-4, 4.8e-10), (1e-6, 0.0)])
def test_fit_recovers_known_alpha_and_beta(alpha, beta):
    fit = fit_line(SIZES, alpha + beta * SIZES)
    assert fit.alpha_s == pytest.approx(alpha, rel=1e-6, abs=1e-15)
    assert fit.slope_s_per_byte == pytest.approx(beta, rel=1e-6, abs=1e-18)
    assert np.abs(fit.error).max() < 1e-6


def test_fit_keeps_terms_non_negative():
    # Times that fall with size would need a negative slope: the fit is latency only.
    fit = fit_line(np.array([1e3, 1e4, 1e5]), np.array([3e-4, 2e-4, 1e-4]))
    assert fit.slope_s_per_byte == 0.0
    assert fit.alpha_s > 0
    # Proportional times: a negative intercept would fit best; clipped to 0.
    fit = fit_line(np.array([1e3, 1e6]), np.array([1e-6, 1.1e-3]))
    assert fit.alpha_s == 0.0 and fit.slope_s_per_byte > 0
    with pytest.raises(ValueError, match="> 0"):
        fit_line(np.array([1.0, 2.0]), np.array([0.0, 1.0]))


def test_fit_error_per_point_is_signed_relative():
    t = np.array([1e-4, 2e-4, 1.2e-3])
    fit = fit_line(np.array([0.0, 1e5, 1e6]), t)
    assert fit.error == pytest.approx((fit.predict_s(np.array([0.0, 1e5, 1e6])) - t) / t)


def test_profile_splits_reduction_term_with_all_gather():
    n, alpha, beta_ag, gamma = 2, 1e-4, 3e-10, 2e-10
    ar = alpha + (2 * beta_ag + gamma) * SIZES
    ag = alpha / 2 + beta_ag * SIZES
    a2a = 5e-5 + 1e-9 * model_bytes("all_to_all", SIZES, n)
    op = ["all_reduce"] * 6 + ["all_gather"] * 6 + ["all_to_all"] * 6
    prof, points = fit_profile("h", np.array(op), np.full(18, n), np.full(18, "intra"),
                               np.tile(SIZES, 3), np.concatenate([ar, ag, a2a]))
    e = prof.lookup("all_reduce", 2, "intra")
    assert e.beta_s_per_byte == pytest.approx(2 * beta_ag, rel=1e-6)
    assert e.gamma_s_per_byte == pytest.approx(gamma, rel=1e-6)
    assert prof.lookup("all_to_all", 2, "intra").beta_s_per_byte == pytest.approx(1e-9, rel=1e-6)
    # The profile reproduces the points it was fitted on (bench sizes -> comm convention).
    assert max(abs(p.error) for p in points) < 1e-6
    assert prof.time_s("all_to_all", 2, "intra", 1024 * (n - 1) / n) == pytest.approx(
        5e-5 + 512e-9, rel=1e-6)


def test_summary_busbw_uses_nccl_tests_factors():
    raw = pa.Table.from_pydict({
        "op": ["all_reduce"] * 3 + ["all_gather"] * 3, "group_size": [4] * 6,
        "placement": ["intra"] * 6, "bytes": [1000] * 6, "iteration": [0, 1, 2] * 2,
        "time_s": [1e-3, 2e-3, 4e-3, 1e-3, 1e-3, 1e-3]}, schema=RAW_SCHEMA)
    rows = summarize(raw).to_pylist()
    ar = rows[0]
    assert (ar["op"], ar["num_iters"], ar["time_s"], ar["min_time_s"]) == ("all_reduce", 3, 2e-3, 1e-3)
    assert ar["algbw_bytes_per_s"] == pytest.approx(5e5)
    assert ar["busbw_bytes_per_s"] == pytest.approx(5e5 * 2 * 3 / 4)
    assert rows[1]["busbw_bytes_per_s"] == pytest.approx(1e6 * 3 / 4)


def test_sizes_and_iterations():
    assert parse_size("64M") == 64 << 20 and parse_size("8") == 8 and parse_size("4k") == 4096
    assert sizes_between(8, 64) == [8, 16, 32, 64]
    assert sizes_between(1024, 1 << 20, factor=4)[-1] == 1 << 20
    assert iterations_for(8, 20) == 20 and iterations_for(8 << 20, 20) == 20
    assert iterations_for(16 << 20, 20) == 10 and iterations_for(64 << 20, 20) == 3
    with pytest.raises(ConfigError, match="size 'x1'"):
        parse_size("x1")
    with pytest.raises(ConfigError, match="below --min-bytes"):
        sizes_between(64, 8)


def test_isotonic_pools_dips_with_their_neighbours():
    assert isotonic(np.array([3.0, 1.0, 2.0, 5.0, 4.0])).tolist() == pytest.approx(
        [2.0, 2.0, 2.0, 4.5, 4.5])
    assert isotonic(np.array([1.0, 2.0, 3.0])).tolist() == [1.0, 2.0, 3.0]


def test_measured_curve_prices_measured_sizes_at_their_medians():
    # A curve with an algorithm switch at 1 MiB: flat, then steep.
    sizes = np.array([1024, 65536, 1 << 20, 4 << 20, 16 << 20], dtype=np.float64)
    t = np.array([3e-4, 3.2e-4, 8e-4, 6e-3, 4e-2])
    op = np.array(["all_gather"] * sizes.size)
    prof, points = fit_profile("h", op, np.full(sizes.size, 2), np.array(["intra"] * sizes.size),
                               sizes, t)
    e = prof.lookup("all_gather", 2, "intra")
    assert [e.time_s(x) for x in sizes] == pytest.approx(t.tolist())
    # Linear between measured sizes, the fitted line below the smallest.
    assert e.time_s(2.5 * 2**20) == pytest.approx(8e-4 + (6e-3 - 8e-4) * 0.5)
    assert e.time_s(512) == pytest.approx(e.alpha_s + 512 * e.beta_s_per_byte)
    # Above the largest: its median plus the fitted slope.
    assert e.time_s(32 << 20) == pytest.approx(4e-2 + (16 << 20) * e.beta_s_per_byte)
    # The reported fit errors are the line's, not the curve's.
    assert points[0].predicted_s == pytest.approx(e.alpha_s + 1024 * e.beta_s_per_byte)
    line_only, _ = fit_profile("h", op, np.full(sizes.size, 2),
                               np.array(["intra"] * sizes.size), sizes, t, measured_curve=False)
    assert line_only.lookup("all_gather", 2, "intra").pieces == []
    # Scaling scales every piece.
    assert prof.scaled(0.5).time_s("all_gather", 2, "intra", 2.5 * 2**20) == pytest.approx(
        0.5 * e.time_s(2.5 * 2**20))


def test_line_pieces_are_checked():
    ok = dict(op="all_reduce", group_size=2, placement="intra", alpha_s=1e-4,
              beta_s_per_byte=1e-9)
    with pytest.raises(ValueError, match="ascending"):
        CommEntry(**ok, pieces=[LinePiece(from_bytes=2e6, alpha_s=1e-3, slope_s_per_byte=0),
                                LinePiece(from_bytes=1e6, alpha_s=1e-3, slope_s_per_byte=0)])
    with pytest.raises(ValueError, match="must be > 0"):
        LinePiece(from_bytes=1e6, alpha_s=-1.0, slope_s_per_byte=1e-9)
    steep = LinePiece(from_bytes=1e6, alpha_s=-1e-3, slope_s_per_byte=2e-9)  # 1 ms at 1 MB
    assert CommEntry(**ok, pieces=[steep]).time_s(2e6) == pytest.approx(3e-3)
