"""`emulator simulate` and `emulator emulate`: parse flags, build a RunConfig, run, write the
output directory and print the summary."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console

from emulator.cli.options import COMMON_FIELDS, EMULATION_FIELDS, config_options
from emulator.cli.progress import request_progress
from emulator.config import build_config
from emulator.errors import ConfigError
from emulator.metrics.format import summary_table
from emulator.metrics.io import RunWriter


def _config(config_file, values):
    cfg = build_config(config_file, **values)
    if not cfg.trace:
        raise ConfigError("no trace given: pass --trace FILE or set `trace` in --config")
    return cfg


@click.command()
@config_options(COMMON_FIELDS)
@click.option("-o", "--output", "outdir", type=click.Path(path_type=Path), required=True,
              help="Output directory (created; tables and summary.json are written atomically).")
@click.option("--no-fast-forward", is_flag=True, help="Step every decode instead of fast-forwarding steady runs (for checking).")
def simulate(config_file, outdir, no_fast_forward, **values):
    """Simulate a trace on a layout with the cost model (no Ray, seconds for whole traces)."""
    from emulator.build import build_run
    from emulator.simulator.run import simulate as run

    cfg = _config(config_file, values)
    writer = RunWriter(outdir)
    setup = build_run(cfg)
    with request_progress(len(setup.trace), "simulating") as advance:
        tables = run(setup, on_progress=advance, fast_forward=not no_fast_forward)
    summary = writer.finish(requests=tables.requests, steps=tables.steps, mode="simulate",
                            config=cfg, extra=tables.extra)
    _print(summary, outdir)


@click.command()
@config_options(COMMON_FIELDS + EMULATION_FIELDS)
@click.option("-o", "--output", "outdir", type=click.Path(path_type=Path), required=True,
              help="Output directory (created; tables and summary.json are written atomically).")
def emulate(config_file, outdir, **values):
    """Emulate a trace on Ray workers: real collectives, real KV blocks, delayed compute."""
    from emulator.build import build_run
    from emulator.runtime.executor import emulate as run

    cfg = _config(config_file, values)
    writer = RunWriter(outdir)
    setup = build_run(cfg, record_slots=True)

    def flush(tables, exc):
        writer.flush_partial(requests=tables.requests, steps=tables.steps,
                             collectives=tables.collectives, mode="emulate", config=cfg,
                             extra=tables.extra, error=exc)

    with request_progress(len(setup.trace), "emulating") as advance:
        tables = run(setup, on_progress=advance, on_partial=flush)
    summary = writer.finish(requests=tables.requests, steps=tables.steps,
                            collectives=tables.collectives, mode="emulate", config=cfg,
                            nodes={"rank_node_ip": tables.extra.pop("nodes", None)},
                            extra=tables.extra)
    _print(summary, outdir)


def _print(summary, outdir) -> None:
    console = Console()
    console.print(summary_table(summary, title=f"{summary['mode']}: {outdir}"))
    if summary.get("extra", {}).get("num_rejected"):
        console.print(f"[yellow]{summary['extra']['num_rejected']} requests rejected[/]: "
                      f"{summary['extra']['rejections'][0]}")


commands = [simulate, emulate]
