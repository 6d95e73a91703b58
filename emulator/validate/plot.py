"""The predicted-vs-measured figure of `emulator validate` (matplotlib, Agg backend)."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from emulator.atomic import atomic_path


def plot_validation(joined: dict[str, np.ndarray], report: dict[str, Any], path: Path) -> None:
    """Left: per step row, predicted against measured time (log-log, y = x dashed). Right:
    per op and size bucket, predicted against measured median collective time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.8))
    prefill = joined["num_prefill_tokens"] > 0
    for sel, label, color in ((~prefill, "decode", "tab:blue"), (prefill, "prefill", "tab:orange")):
        if sel.any():
            ax1.scatter(joined["measured_s"][sel] * 1e3, joined["predicted_s"][sel] * 1e3,
                        s=8, alpha=0.6, label=f"{label} ({int(sel.sum())})", color=color)
    _diagonal(ax1, np.r_[joined["measured_s"], joined["predicted_s"]] * 1e3)
    ax1.set(xscale="log", yscale="log", xlabel="measured step time (ms)",
            ylabel="predicted step time (ms)",
            title=f"steps: median error {_pct(report.get('step_time_median_error'))}, "
                  f"noise floor {_pct(report.get('noise_floor_mape'))}")
    ax1.legend(loc="upper left")
    rows = report.get("collectives", {}).get("by_op", [])
    if rows:
        m = np.array([r["measured_median_s"] for r in rows]) * 1e6
        p = np.array([r["predicted_median_s"] for r in rows]) * 1e6
        ax2.scatter(m, p, color="tab:green")
        for r, x, y in zip(rows, m, p):
            ax2.annotate(f"{r['op']} {r['bucket']}", (x, y), fontsize=7,
                         textcoords="offset points", xytext=(4, 2))
        _diagonal(ax2, np.r_[m, p])
    ax2.set(xscale="log", yscale="log", xlabel="measured median collective time (µs)",
            ylabel="predicted median (µs)", title="collectives per op and size bucket")
    fig.suptitle("\n".join(textwrap.wrap(report.get("verdict", ""), 150)), fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _diagonal(ax, values: np.ndarray) -> None:
    v = values[np.isfinite(values) & (values > 0)]
    if v.size:
        lo, hi = v.min() / 1.5, v.max() * 1.5
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)


def _pct(x) -> str:
    return "-" if x is None else f"{x * 100:+.1f}%"
