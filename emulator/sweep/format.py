"""The sweep's decision table: a rich Table for the terminal and Markdown for docs (no I/O)."""

from __future__ import annotations

from rich.table import Table

from emulator.metrics.format import format_seconds
from emulator.sweep.bottleneck import KV_PEAK, MIN_LOSS
from emulator.sweep.run import RANK_BY, SweepResult

HEADERS = ("#", "layout", "drain", "tok/s", "TTFT p99", "TPOT p99", "peak KV", "preempt",
           "comm", "bubbles", "imbal.", "bottleneck")

RULE = (f"Bottleneck rule: KV capacity if any preemption or peak KV >= {KV_PEAK:.0%}; else "
        f"the largest of communication share, PP bubble fraction and routing imbalance if "
        f">= {MIN_LOSS:.0%}; else compute or memory bandwidth by the cost model's roofline "
        "(the side that holds most of the compute time). See emulator/sweep/bottleneck.py.")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.1f}%"


def cells(row: dict) -> list[str]:
    unfinished = row["num_finished"] < row["num_requests"]
    drain = format_seconds(row["drain_time_s"])
    if unfinished:
        drain += f" ({row['num_finished']}/{row['num_requests']} done)"
    tput = row["throughput_tokens_per_s"]
    return [str(row["rank"]), row["layout"], drain, "-" if tput is None else f"{tput:,.0f}",
            format_seconds(row["ttft_p99_s"]), format_seconds(row["tpot_p99_s"]),
            _pct(row["kv_peak_usage"]), f"{row['num_preemptions']:,}", _pct(row["comm_share"]),
            _pct(row["bubble_fraction"]), _pct(row["imbalance"]), row["bottleneck"]]


def _title(result: SweepResult) -> str:
    b = result.base
    column, larger = RANK_BY[result.rank_by]
    order = "descending" if larger else "ascending"
    return (f"{result.mode}: {b.model} on {result.num_gpus} x {b.hardware}, {b.trace.name}, "
            f"ranked by {result.rank_by} ({order})")


def sweep_table(result: SweepResult) -> Table:
    table = Table(title=_title(result), show_header=True, header_style="bold")
    for i, header in enumerate(HEADERS):
        table.add_column(header, justify="left" if i in (1, 11) else "right")
    for row in result.rows:
        table.add_row(*cells(row))
    return table


def footnotes(result: SweepResult) -> list[str]:
    notes = [RULE]
    for s in result.skipped:
        notes.append(f"skipped {s.name}: {s.reason}")
    return notes


def sweep_markdown(result: SweepResult) -> str:
    lines = [f"**{_title(result)}**", "", "| " + " | ".join(HEADERS) + " |",
             "|" + "|".join("---" if i in (1, 11) else "--:" for i in range(len(HEADERS))) + "|"]
    lines.extend("| " + " | ".join(cells(row)) + " |" for row in result.rows)
    lines.append("")
    lines.extend(f"- {note}" for note in footnotes(result))
    return "\n".join(lines) + "\n"
