"""Run metrics from the output tables, and the ``summary.json`` document.

Conventions (so simulator and emulator summaries compare like for like):

- Latency percentiles use numpy's default method (``method="linear"``: linear interpolation
  between the two nearest order statistics, i.e. Hyndman & Fan type 7), over the requests
  where the value is defined: finished requests for e2e, requests with a first token for
  TTFT, finished requests with more than one output token for TPOT.
- ``drain_time_s`` = last finish - first arrival (over all requests in the table).
- Throughputs count the tokens of *finished* requests over the drain time:
  ``throughput_tokens_per_s`` output tokens, ``total_throughput_tokens_per_s`` prompt +
  output tokens.
- A metric that is undefined (no finished request, an empty table) is ``None`` (JSON null),
  never NaN, so ``summary.json`` stays strict JSON.
- ``by_axis`` (only when collective records are given): per mesh axis, ``num_ops``
  (instances), and ``comm_s`` (exit - entry), ``sync_wait_s`` and ``transfer_s`` summed over
  the axis's rows and divided by the number of distinct ranks on that axis: seconds per
  participating rank over the run.
"""

from __future__ import annotations

import importlib.metadata
import math
import platform
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from emulator.metrics.instances import instance_ids
from emulator.metrics.schema import SCHEMA_VERSION

MODES = ("simulate", "emulate")

METRIC_KEYS = ("num_requests", "num_finished", "drain_time_s", "throughput_tokens_per_s",
               "total_throughput_tokens_per_s", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s",
               "tpot_p99_s", "e2e_p50_s", "e2e_p99_s", "num_preemptions", "kv_peak_usage",
               "compute_s", "comm_s")
"""Keys of :func:`compute_metrics` always present (``by_axis`` is added with collectives)."""

# distribution names of the packages whose versions go into the summary
_PACKAGES = {"emulator": "llm-parallel-emulator", "numpy": "numpy", "pyarrow": "pyarrow",
             "torch": "torch", "ray": "ray"}


def _col(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).to_numpy(zero_copy_only=False)


def _finite_or_none(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _percentile(values: np.ndarray, q: float) -> float | None:
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return None
    return float(np.percentile(values, q))  # numpy default: method="linear"


def compute_metrics(requests: pa.Table, steps: pa.Table,
                    collectives: pa.Table | None = None) -> dict[str, Any]:
    """Summary metrics of a run (see the module docstring for definitions and units)."""
    arrival = _col(requests, "arrival_s")
    finish = _col(requests, "finish_s")
    finished = np.isfinite(finish)
    num_finished = int(finished.sum())
    drain_s = float(finish[finished].max() - arrival.min()) if num_finished else math.nan
    out_tokens = float(_col(requests, "output_tokens")[finished].sum())
    in_tokens = float(_col(requests, "prompt_tokens")[finished].sum())
    with np.errstate(divide="ignore", invalid="ignore"):
        throughput = out_tokens / drain_s if drain_s > 0 else math.nan
        total_throughput = (out_tokens + in_tokens) / drain_s if drain_s > 0 else math.nan

    metrics: dict[str, Any] = {
        "num_requests": requests.num_rows,
        "num_finished": num_finished,
        "drain_time_s": _finite_or_none(drain_s),
        "throughput_tokens_per_s": _finite_or_none(throughput),
        "total_throughput_tokens_per_s": _finite_or_none(total_throughput),
    }
    for name in ("ttft", "tpot", "e2e"):
        values = _col(requests, f"{name}_s")
        metrics[f"{name}_p50_s"] = _percentile(values, 50)
        metrics[f"{name}_p99_s"] = _percentile(values, 99)
    metrics["num_preemptions"] = int(_col(requests, "num_preemptions").sum())

    used = _col(steps, "kv_blocks_used").astype(np.float64)
    total = _col(steps, "kv_blocks_total").astype(np.float64)
    has_pool = total > 0
    metrics["kv_peak_usage"] = (float((used[has_pool] / total[has_pool]).max())
                                if has_pool.any() else None)
    metrics["compute_s"] = float(_col(steps, "compute_s").sum())
    metrics["comm_s"] = float(_col(steps, "comm_s").sum())
    if collectives is not None:
        metrics["by_axis"] = _by_axis(collectives)
    return metrics


def _by_axis(collectives: pa.Table) -> dict[str, dict[str, float | int]]:
    axis = _col(collectives, "axis").astype(str)
    rank = _col(collectives, "rank")
    duration = _col(collectives, "exit_s") - _col(collectives, "entry_s")
    sync = _col(collectives, "sync_wait_s")
    transfer = _col(collectives, "transfer_s")
    # instance key (see emulator.metrics.instances): count distinct keys per axis
    inst = instance_ids(replica=_col(collectives, "replica"), step=_col(collectives, "step"),
                        group=_col(collectives, "group"), seq=_col(collectives, "seq"))
    out: dict[str, dict[str, float | int]] = {}
    for name in sorted(set(axis.tolist())):
        sel = axis == name
        num_ranks = len(np.unique(rank[sel]))
        out[name] = {
            "num_ops": len(np.unique(inst[sel])),
            "comm_s": float(duration[sel].sum() / num_ranks),
            "sync_wait_s": float(sync[sel].sum() / num_ranks),
            "transfer_s": float(transfer[sel].sum() / num_ranks),
        }
    return out


def package_versions() -> dict[str, str | None]:
    """Versions of the packages a run depends on; ``None`` for one not installed. Read from
    the installed distributions' metadata, so ray and torch are not imported."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for key, dist in _PACKAGES.items():
        try:
            versions[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[key] = None
    return versions


def build_summary(*, complete: bool, mode: str, config: Mapping[str, Any] | Any,
                  metrics: Mapping[str, Any] | None, nodes: Mapping[str, Any] | None = None,
                  extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``summary.json`` document.

    ``config`` is the full run config: a mapping, or a pydantic model (dumped in JSON mode).
    ``nodes`` maps each rank (as a string) to its node; ``extra`` holds anything else the
    caller wants kept (e.g. ``error`` for an interrupted run), under the key ``extra``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if hasattr(config, "model_dump"):
        config = config.model_dump(mode="json")
    return {
        "schema_version": SCHEMA_VERSION,
        "complete": bool(complete),
        "mode": mode,
        "config": dict(config),
        "versions": package_versions(),
        "nodes": dict(nodes) if nodes is not None else None,
        "metrics": dict(metrics) if metrics is not None else None,
        "extra": dict(extra) if extra is not None else {},
    }
