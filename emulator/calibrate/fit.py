"""Fitting alpha-beta lines to microbenchmark points (pure: numpy only).

One line per (op, group size, placement): ``time_s = alpha_s + bytes * slope``, fitted by
weighted least squares on the *relative* residual ``(alpha + slope * x - t) / t``. Plain
least squares on absolute times would let the 64 MiB points decide everything and leave
the latency-bound sizes tens of percent off; relative weighting balances the decades
(the same choice as fitting log-time, without the bias of averaging logs). Both terms are
constrained to be >= 0 (a negative latency or bandwidth term means the points are noise);
on exact points the fit recovers alpha and slope to rounding.

Byte conventions are those of ``emulator.cost.comm`` (the benchmark's nccl-tests sizes are
converted first: an all-to-all of ``S`` bytes per rank moves ``S * (n - 1) / n`` off-rank).

The reduction term: one op's slope cannot separate "moving bytes" from "adding bytes"
(they are collinear), so it is split with a second op. A ring all-reduce moves twice what an
all-gather of the same nominal size moves (``2(n-1)/n`` against ``(n-1)/n``, see comm.py),
so ``beta = 2 * slope(all_gather)`` and ``gamma = slope(all_reduce) - beta`` when the
all-gather of the same group was measured and the difference is positive; otherwise
``gamma = 0``. The split changes no prediction (beta + gamma = slope); it reports where
the time goes (CPU reductions in gloo are not free).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from emulator.cost.comm import CommEntry, CommProfile, HostOverhead

BUS_FACTOR = {
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "all_to_all": lambda n: (n - 1) / n,
    "send_recv": lambda n: 1.0,
}
"""nccl-tests' bus-bandwidth factors, busbw = algbw * factor (doc/PERFORMANCE.md)."""


@dataclass(frozen=True, slots=True)
class LineFit:
    alpha_s: float
    slope_s_per_byte: float
    error: np.ndarray
    """float [P]: (predicted - measured) / measured per point, signed."""

    def predict_s(self, num_bytes: np.ndarray) -> np.ndarray:
        return self.alpha_s + self.slope_s_per_byte * np.asarray(num_bytes, dtype=np.float64)


def fit_line(num_bytes: np.ndarray, time_s: np.ndarray) -> LineFit:
    """Non-negative alpha + slope * bytes minimizing the summed squared relative error."""
    x = np.asarray(num_bytes, dtype=np.float64)
    t = np.asarray(time_s, dtype=np.float64)
    if x.shape != t.shape or x.ndim != 1 or x.size == 0:
        raise ValueError(f"need equal-length 1-D bytes and times, got {x.shape}, {t.shape}")
    if not (t > 0).all():
        raise ValueError("measured times must be > 0")
    w = 1.0 / t
    # Rows of the weighted system: [w, w * x] @ [alpha, slope] = w * t = 1.
    a = np.column_stack([w, w * x])
    b = np.ones_like(t)
    candidates = []
    if x.size >= 2 and np.ptp(x) > 0:
        (alpha, slope), *_ = np.linalg.lstsq(a, b, rcond=None)
        if alpha >= 0 and slope >= 0:
            candidates.append((alpha, slope))
    # Boundary solutions: latency only, or bandwidth only.
    candidates.append((float(w.sum() / (w * w).sum()), 0.0))
    if (x > 0).any():
        candidates.append((0.0, float((w * x).sum() / ((w * x) ** 2).sum())))
    alpha, slope = min(candidates, key=lambda c: float(((a @ np.array(c) - b) ** 2).sum()))
    pred = alpha + slope * x
    return LineFit(float(alpha), float(slope), (pred - t) / t)


def model_bytes(op: str, bench_bytes: np.ndarray, group_size: int) -> np.ndarray:
    """Benchmark (nccl-tests) size -> the byte convention of emulator.cost.comm."""
    x = np.asarray(bench_bytes, dtype=np.float64)
    if op == "all_to_all":
        return x * (group_size - 1) / group_size
    return x


@dataclass(frozen=True, slots=True)
class FitPoint:
    op: str
    group_size: int
    placement: str
    num_bytes: int
    measured_s: float
    predicted_s: float

    @property
    def error(self) -> float:
        return (self.predicted_s - self.measured_s) / self.measured_s


def fit_profile(name: str, op: np.ndarray, group_size: np.ndarray, placement: np.ndarray,
                num_bytes: np.ndarray, time_s: np.ndarray,
                host: HostOverhead | None = None) -> tuple[CommProfile, list[FitPoint]]:
    """One alpha-beta(-gamma) entry per (op, group size, placement) from per-size median
    times (benchmark byte convention); returns the profile and the fit error per point."""
    op, placement = np.asarray(op).astype(str), np.asarray(placement).astype(str)
    group_size = np.asarray(group_size, dtype=np.int64)
    fits: dict[tuple[str, int, str], tuple[LineFit, np.ndarray, np.ndarray]] = {}
    for key in sorted(set(zip(op.tolist(), group_size.tolist(), placement.tolist()))):
        sel = (op == key[0]) & (group_size == key[1]) & (placement == key[2])
        x = model_bytes(key[0], np.asarray(num_bytes)[sel], key[1])
        t = np.asarray(time_s, dtype=np.float64)[sel]
        fits[key] = (fit_line(x, t), np.asarray(num_bytes)[sel], t)
    entries, points = [], []
    for (o, n, pl), (fit, raw_bytes, t) in fits.items():
        beta, gamma = fit.slope_s_per_byte, 0.0
        gather = fits.get(("all_gather", n, pl))
        if o == "all_reduce" and gather is not None:
            moved = 2.0 * gather[0].slope_s_per_byte
            if 0.0 < moved < fit.slope_s_per_byte:
                beta, gamma = moved, fit.slope_s_per_byte - moved
        entries.append(CommEntry(op=o, group_size=n if o != "send_recv" else 2, placement=pl,
                                 alpha_s=fit.alpha_s, beta_s_per_byte=beta,
                                 gamma_s_per_byte=gamma))
        pred = fit.predict_s(model_bytes(o, raw_bytes, n))
        points += [FitPoint(o, n, pl, int(b), float(m), float(p))
                   for b, m, p in zip(raw_bytes.tolist(), t.tolist(), pred.tolist())]
    return CommProfile(name=name, entries=entries, host=host), points
