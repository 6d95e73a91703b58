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

The line summarizes the host (latency, bandwidth) and prices sizes outside the measured
range; inside it, a calibrated profile prices with the measured medians themselves
(:func:`measured_pieces`), because gloo switches algorithm with the size and its curve is not
one line (the all-gather at 2 ranks: ~0.3 ms flat to 128 KiB, then ~0.8 ns/B, then several
times steeper above 16 MiB on the development VM).

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

from emulator.cost.comm import CommEntry, CommProfile, HostOverhead, LinePiece

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


def isotonic(values: np.ndarray) -> np.ndarray:
    """The non-decreasing sequence closest to ``values`` in least squares (pool adjacent
    violators): a collective's median time never really falls when the message grows, so a
    dip is noise and is averaged with its neighbours."""
    blocks: list[list[float]] = []  # [sum, count]
    for v in np.asarray(values, dtype=np.float64).tolist():
        blocks.append([v, 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    return np.concatenate([np.full(int(c), s / c) for s, c in blocks])


def measured_pieces(num_bytes: np.ndarray, time_s: np.ndarray,
                    slope_s_per_byte: float) -> list[LinePiece]:
    """The measured curve as line pieces: from the smallest measured size to the largest,
    straight between consecutive per-size medians (made non-decreasing by :func:`isotonic`);
    above the largest, its median plus the fitted slope. Libraries switch algorithm with the
    message size (gloo's all-gather at 2 ranks is several times slower per byte above a few
    MiB than below), which no single alpha-beta line follows; the measured points do."""
    x = np.asarray(num_bytes, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    xs, ts = x[order], np.asarray(time_s, dtype=np.float64)[order]
    # One point per size (callers pass medians); a piece starts at a size > 0.
    keep = np.r_[xs[1:] != xs[:-1], True] & (xs > 0)
    xs, ts = xs[keep], isotonic(ts[keep])
    if xs.size == 0:
        return []
    pieces = []
    for i in range(xs.size - 1):
        slope = (ts[i + 1] - ts[i]) / (xs[i + 1] - xs[i])
        pieces.append(LinePiece(from_bytes=xs[i], alpha_s=ts[i] - slope * xs[i],
                                slope_s_per_byte=slope))
    pieces.append(LinePiece(from_bytes=xs[-1], alpha_s=ts[-1] - slope_s_per_byte * xs[-1],
                            slope_s_per_byte=slope_s_per_byte))
    return pieces


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
                host: HostOverhead | None = None, measured_curve: bool = True
                ) -> tuple[CommProfile, list[FitPoint]]:
    """One alpha-beta(-gamma) entry per (op, group size, placement) from per-size median
    times (benchmark byte convention); returns the profile and the fit error per point (of
    the line). With ``measured_curve`` each entry also carries the measured medians as
    pieces (:func:`measured_pieces`), which then price every size from the smallest
    measured one on; the line prices smaller sizes."""
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
        x = model_bytes(o, raw_bytes, n)
        pieces = measured_pieces(x, t, fit.slope_s_per_byte) if measured_curve else []
        entries.append(CommEntry(op=o, group_size=n if o != "send_recv" else 2, placement=pl,
                                 alpha_s=fit.alpha_s, beta_s_per_byte=beta,
                                 gamma_s_per_byte=gamma, pieces=pieces))
        pred = fit.predict_s(x)
        points += [FitPoint(o, n, pl, int(b), float(m), float(p))
                   for b, m, p in zip(raw_bytes.tolist(), t.tolist(), pred.tolist())]
    return CommProfile(name=name, entries=entries, host=host), points
