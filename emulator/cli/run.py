"""`emulator simulate` and `emulator emulate`: parse flags, build a RunConfig, run, write the
output directory and print the summary."""

from __future__ import annotations

import signal
from pathlib import Path

import click
import numpy as np
from rich.console import Console

from emulator.cli.options import COMMON_FIELDS, EMULATION_FIELDS, config_options
from emulator.cli.progress import request_progress
from emulator.config import build_config
from emulator.errors import ConfigError, RunError
from emulator.metrics.format import summary_table
from emulator.metrics.io import RunWriter


def _config(config_file, values):
    cfg = build_config(config_file, **values)
    if not cfg.trace:
        raise ConfigError("no trace given: pass --trace FILE or set `trace` in --config")
    return cfg


_report_option = click.option(
    "--report", is_flag=True, help="Also write OUTDIR/report.html (plots, opens offline).")


@click.command()
@config_options(COMMON_FIELDS)
@click.option("-o", "--output", "outdir", type=click.Path(path_type=Path), required=True,
              help="Output directory (created; tables and summary.json are written atomically).")
@click.option("--no-fast-forward", is_flag=True, help="Step every decode instead of fast-forwarding steady runs (for checking).")
@_report_option
def simulate(config_file, outdir, no_fast_forward, report, **values):
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
    _print(summary, outdir, report)


@click.command()
@config_options(COMMON_FIELDS + EMULATION_FIELDS)
@click.option("-o", "--output", "outdir", type=click.Path(path_type=Path), required=True,
              help="Output directory (created; tables and summary.json are written atomically).")
@click.option("--checkpoint-interval-s", type=click.FloatRange(min=1.0), default=30.0,
              show_default=True,
              help="Write the records so far (summary.json complete=false) this often, so an "
                   "interrupted run keeps what it measured.")
@click.option("--dashboard", is_flag=True,
              help="Start the Ray dashboard (on 127.0.0.1) with the local Ray; off by default.")
@_report_option
def emulate(config_file, outdir, checkpoint_interval_s, dashboard, report, **values):
    """Emulate a trace on Ray workers: real collectives, real KV blocks, delayed compute.

    A failed rank, a collective that times out (--timeout-s), an unreachable --address,
    Ctrl-C or SIGTERM ends the run with one line naming what failed; the finished work stays
    in the output directory with complete=false in summary.json."""
    from emulator.build import build_run
    from emulator.runtime.executor import emulate as run

    cfg = _config(config_file, values)
    writer = RunWriter(outdir)
    setup = build_run(cfg, record_slots=True)
    kept = {"steps": 0, "requests": 0}

    def write_partial(tables, exc=None):
        if isinstance(exc, KeyboardInterrupt):
            exc = "interrupted (Ctrl-C)"
        elif isinstance(exc, SystemExit) and exc.code == signal.SIGTERM:
            exc = "terminated (SIGTERM)"
        kept["steps"] = int((tables.steps["stage"].to_numpy() == 0).sum())  # one per plan
        kept["requests"] = int(np.isfinite(tables.requests["finish_s"].to_numpy()).sum())
        writer.flush_partial(requests=tables.requests, steps=tables.steps,
                             collectives=tables.collectives, mode="emulate", config=cfg,
                             nodes=tables.extra.pop("nodes", None), extra=tables.extra,
                             error=exc, moe=tables.moe)

    def kept_note() -> str:
        return (f"kept {kept['steps']} finished step(s) and {kept['requests']} finished "
                f"request(s) in {outdir} (summary.json complete=false)")

    try:
        with request_progress(len(setup.trace), "emulating") as advance:
            tables = run(setup, on_progress=advance, on_partial=write_partial,
                         on_checkpoint=write_partial,
                         checkpoint_interval_s=checkpoint_interval_s,
                         include_dashboard=dashboard)
    except RunError as exc:
        raise RunError(f"{exc}; {kept_note()}") from None
    except KeyboardInterrupt:
        click.echo(f"interrupted (Ctrl-C): {kept_note()}", err=True)
        raise click.exceptions.Exit(130) from None
    except SystemExit as exc:
        # Ray's driver turns SIGTERM into sys.exit(SIGTERM); the records are already written.
        if exc.code != signal.SIGTERM:
            raise
        click.echo(f"terminated (SIGTERM): {kept_note()}", err=True)
        raise click.exceptions.Exit(128 + signal.SIGTERM) from None
    summary = writer.finish(requests=tables.requests, steps=tables.steps,
                            collectives=tables.collectives, mode="emulate", config=cfg,
                            nodes=tables.extra.pop("nodes", None), extra=tables.extra,
                            moe=tables.moe)
    _print(summary, outdir, report)


def _print(summary, outdir, report: bool = False) -> None:
    console = Console()
    if report:
        from emulator.metrics.report import write_report

        console.print(f"report: {write_report(outdir)}")
    console.print(summary_table(summary, title=f"{summary['mode']}: {outdir}"))
    if summary.get("extra", {}).get("num_rejected"):
        console.print(f"[yellow]{summary['extra']['num_rejected']} requests rejected[/]: "
                      f"{summary['extra']['rejections'][0]}")


commands = [simulate, emulate]
