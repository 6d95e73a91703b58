"""``emulator trace``: import public traces, generate synthetic ones, inspect a trace file.

No logic here beyond parsing flags: the work is in :mod:`emulator.trace`. Errors are
:class:`emulator.errors.UserError` subclasses, printed as one line with exit code 2 by the
top-level group; outputs are written atomically, so a failed command leaves no file.
"""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from emulator.errors import UserError
from emulator.trace import importers
from emulator.trace.io import describe, read_trace, write_trace
from emulator.trace.synth import ARRIVALS, LENGTHS, synth_trace


class TraceCliError(UserError, ValueError):
    """A flag combination that does not make sense; the message names the flag."""


def _tokens(value: str | None, flag: str) -> int | tuple[int, int] | None:
    """``N`` (fixed) or ``LOW:HIGH`` (uniform, inclusive)."""
    if value is None:
        return None
    try:
        parts = [int(p) for p in value.split(":")]
    except ValueError:
        raise TraceCliError(f"{flag} {value!r}: expected N or LOW:HIGH (integers)") from None
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return parts[0], parts[1]
    raise TraceCliError(f"{flag} {value!r}: expected N or LOW:HIGH")


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(),
                    TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                    console=Console(stderr=True), transient=True)


def _written(path: Path, n: int) -> None:
    click.echo(f"wrote {n} requests to {path}")


@click.group(name="trace")
def trace() -> None:
    """Request traces: import, synthesize, inspect (Arrow IPC .arrow or .parquet)."""


@trace.command(name="import")
@click.argument("src", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(importers.FORMATS), required=True,
              help="Source format: azure CSV, vidur CSV, mooncake JSONL, servegen folder.")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Output trace (.arrow or .parquet).")
@click.option("--num-requests", type=int, default=None,
              help="Keep the first N arrivals (servegen: how many to sample; default all).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed for servegen sampling and vidur length-only arrivals.")
@click.option("--arrival", type=click.Choice(ARRIVALS), default=None,
              help="Arrival process for vidur length-only files (no arrived_at column).")
@click.option("--rate", type=float, default=None, help="Mean arrival rate, requests/s.")
@click.option("--cv", type=float, default=None, help="Inter-arrival CV for --arrival gamma.")
@click.option("--start-s", type=float, default=0.0, show_default=True,
              help="servegen: time of day (s) where sampling starts.")
@click.option("--duration-s", type=float, default=None,
              help="servegen: length of the sampled span (s); default to the end of the day.")
@click.option("--clients", type=str, default=None,
              help="servegen: comma-separated client (chunk) ids; default all.")
def import_(src: Path, fmt: str, output: Path, num_requests: int | None, seed: int,
            arrival: str | None, rate: float | None, cv: float | None, start_s: float,
            duration_s: float | None, clients: str | None) -> None:
    """Convert a public trace SRC to a v1 trace file."""
    if fmt != "vidur" and (arrival or rate is not None or cv is not None):
        raise TraceCliError("--arrival/--rate/--cv apply to --format vidur only")
    if fmt != "servegen" and (clients or duration_s is not None or start_s):
        raise TraceCliError("--start-s/--duration-s/--clients apply to --format servegen only")
    if fmt == "azure":
        result = importers.import_azure(src, num_requests=num_requests)
    elif fmt == "vidur":
        result = importers.import_vidur(src, arrival=arrival, rate=rate, cv=cv, seed=seed,
                                        num_requests=num_requests)
    elif fmt == "mooncake":
        result = importers.import_mooncake(src, num_requests=num_requests)
    else:
        try:
            client_ids = None if clients is None else \
                [int(c) for c in clients.split(",") if c.strip()]
        except ValueError:
            raise TraceCliError(f"--clients {clients!r}: expected integers like 0,5,35") from None
        with _progress() as bar:
            task = bar.add_task("sampling servegen windows", total=None)
            result = importers.import_servegen(
                src, num_requests=num_requests, seed=seed, start_s=start_s,
                duration_s=duration_s, clients=client_ids,
                progress=lambda done, total: bar.update(task, completed=done, total=total))
    write_trace(result, output)
    _written(output, len(result))


@trace.command()
@click.option("--kind", type=click.Choice(LENGTHS), default="reasoning", show_default=True,
              help="Length distribution.")
@click.option("--num-requests", type=int, required=True, help="Number of requests.")
@click.option("--arrival", type=click.Choice(ARRIVALS), default="batch", show_default=True,
              help="Arrival process (batch: all at t=0).")
@click.option("--rate", type=float, default=None, help="Mean arrival rate, requests/s.")
@click.option("--cv", type=float, default=None, help="Inter-arrival CV for --arrival gamma.")
@click.option("--prompt-tokens", type=str, default=None,
              help="fixed: N; uniform: LOW:HIGH (inclusive).")
@click.option("--output-tokens", type=str, default=None,
              help="fixed: N; uniform: LOW:HIGH (inclusive).")
@click.option("--max-output-tokens", type=int, default=32768, show_default=True,
              help="Cap on output length.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Output trace (.arrow or .parquet).")
def synth(kind: str, num_requests: int, arrival: str, rate: float | None, cv: float | None,
          prompt_tokens: str | None, output_tokens: str | None, max_output_tokens: int,
          seed: int, output: Path) -> None:
    """Generate a synthetic trace."""
    result = synth_trace(num_requests=num_requests, lengths=kind, arrival=arrival, rate=rate,
                         cv=cv, prompt_tokens=_tokens(prompt_tokens, "--prompt-tokens"),
                         output_tokens=_tokens(output_tokens, "--output-tokens"),
                         max_output_tokens=max_output_tokens, seed=seed)
    write_trace(result, output)
    _written(output, len(result))


@trace.command()
@click.argument("file", type=click.Path(path_type=Path))
def inspect(file: Path) -> None:
    """Validate FILE and print its size, time span, rate and length statistics."""
    stats = describe(read_trace(file))
    rate = stats["mean_rate_per_s"]
    console = Console()
    summary = Table("requests", "time span (s)", "mean rate (req/s)", title=str(file),
                    title_justify="left")
    summary.add_row(f"{stats['num_requests']:,}", f"{stats['span_s']:,.1f}",
                    f"{rate:,.2f}" if rate is not None else "n/a (all at t=0)")
    console.print(summary)
    table = Table("tokens", "mean", "p50", "p90", "p99", "max")
    for name in ("prompt_tokens", "output_tokens", "reasoning_tokens"):
        if f"{name}.mean" in stats:
            table.add_row(name, *(f"{stats[f'{name}.{k}']:,.1f}" for k in ("mean", "p50", "p90",
                                                                            "p99")),
                          f"{stats[f'{name}.max']:,}")
    console.print(table)


commands = [trace]
