"""A rich table of a run's summary metrics (the CLI prints it; no I/O here)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.table import Table

_MISSING = "-"


def format_seconds(value: float | None) -> str:
    """Seconds with a unit that keeps 3 significant figures readable: µs, ms or s."""
    if value is None:
        return _MISSING
    if abs(value) >= 1.0:
        return f"{value:.3f} s"
    if abs(value) >= 1e-3:
        return f"{value * 1e3:.3f} ms"
    return f"{value * 1e6:.1f} µs"


def _fmt_number(value: float | None, fmt: str, unit: str = "") -> str:
    return _MISSING if value is None else f"{value:{fmt}}{unit}"


def summary_table(summary: Mapping[str, Any], *, title: str | None = None) -> Table:
    """Render the metrics of a ``summary.json`` document, or a bare metrics dict from
    :func:`emulator.metrics.summary.compute_metrics`, as a two-column rich Table."""
    metrics = summary["metrics"] if "metrics" in summary else summary
    if metrics is None:
        metrics = {}
    if title is None and "mode" in summary:
        state = "complete" if summary.get("complete") else "INCOMPLETE"
        title = f"{summary['mode']} run ({state})"
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")

    get = metrics.get
    if "num_requests" in metrics:
        table.add_row("requests finished",
                      f"{get('num_finished', 0)} / {get('num_requests', 0)}")
    table.add_row("throughput (output)",
                  _fmt_number(get("throughput_tokens_per_s"), ",.1f", " tok/s"))
    if "total_throughput_tokens_per_s" in metrics:
        table.add_row("throughput (prompt + output)",
                      _fmt_number(get("total_throughput_tokens_per_s"), ",.1f", " tok/s"))
    table.add_row("drain time", format_seconds(get("drain_time_s")))
    for label, key in (("TTFT", "ttft"), ("TPOT", "tpot"), ("E2E", "e2e")):
        table.add_row(f"{label} p50 / p99",
                      f"{format_seconds(get(f'{key}_p50_s'))} / "
                      f"{format_seconds(get(f'{key}_p99_s'))}")
    table.add_row("preemptions", _fmt_number(get("num_preemptions"), "d"))
    peak = get("kv_peak_usage")
    table.add_row("peak KV use", _MISSING if peak is None else f"{peak * 100:.1f} %")

    by_axis = get("by_axis") or {}
    if by_axis or "compute_s" in metrics:
        table.add_section()
        table.add_row("compute (sum over steps)", format_seconds(get("compute_s")))
        table.add_row("comm (sum over steps)", format_seconds(get("comm_s")))
    for axis, values in by_axis.items():
        table.add_row(f"{axis}: comm / sync-wait / transfer per rank",
                      f"{format_seconds(values.get('comm_s'))} / "
                      f"{format_seconds(values.get('sync_wait_s'))} / "
                      f"{format_seconds(values.get('transfer_s'))}")
    modes = (summary.get("extra") or {}).get("host_mode") if "metrics" in summary else None
    if modes:
        table.add_section()
        table.add_row("ranks wait", host_mode_text(modes))
        control = (summary.get("extra") or {}).get("control") or {}
        if "driver_realtime" in control:
            table.add_row("driver", "real-time priority" if control["driver_realtime"]
                          else "normal priority")
    return table


def host_mode_text(modes: list[Mapping[str, Any]]) -> str:
    """One line for the ranks' host modes (Worker.set_host_mode reports): how delays are
    waited, the node's spinners, the CPU priority, the CPUs the ranks are pinned to (by
    rank), and the TCP congestion control their sockets got, where reported."""
    spins = sorted({m["spin_s"] for m in modes}, key=lambda s: (s is None, s or 0.0))
    waits = ", ".join("delays spun" if s is None
                      else f"delays slept ({format_seconds(s)} spun)" for s in spins)
    num_rt = sum(bool(m["realtime"]) for m in modes)
    priority = ("real-time priority" if num_rt == len(modes) else "normal priority"
                if num_rt == 0 else f"real-time priority on {num_rt} of {len(modes)} ranks")
    cpus = [m.get("cpu") for m in modes]
    pinned = ("not pinned" if all(c is None for c in cpus) else "pinned to CPUs "
              + ",".join("-" if c is None else str(c) for c in cpus))
    text = f"{waits}; {sum(m['spinners'] for m in modes)} idle spinners; {priority}; {pinned}"
    congestion = sorted({m["tcp_congestion"] for m in modes if m.get("tcp_congestion")})
    return text + (f"; TCP {'/'.join(congestion)}" if congestion else "")
