"""`emulator sweep` (rank every layout of N GPUs) and `emulator report` (one HTML file)."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console

from emulator.cli.options import COMMON_FIELDS, EMULATION_FIELDS, config_options
from emulator.config import build_config
from emulator.errors import ConfigError

_LAYOUT_FIELDS = ("dp", "tp", "pp", "ep", "attention_dp")
_SWEEP_FIELDS = tuple(f for f in COMMON_FIELDS + EMULATION_FIELDS if f not in _LAYOUT_FIELDS)


@click.command()
@config_options(_SWEEP_FIELDS)
@click.option("--gpus", "num_gpus", type=int, required=True,
              help="GPUs per layout: every dp x tp x pp == GPUS combination is considered.")
@click.option("--layouts", default="auto", show_default=True,
              help="auto (every valid layout) or a comma-separated list of layout names, "
                   "e.g. dp2-tp4,tp8,tp4-pp2-ep8,dp8-ep8-adp.")
@click.option("--mode", type=click.Choice(["simulate", "emulate"]), default="simulate",
              show_default=True, help="Simulate (parallel Ray tasks) or emulate each layout.")
@click.option("--rank-by", type=click.Choice(["drain", "throughput", "ttft_p99", "tpot_p99"]),
              default="drain", show_default=True, help="Column the table is ranked by.")
@click.option("--workers", type=int, default=None,
              help="Parallel simulations (Ray tasks); 1 runs them in this process. "
                   "[default: CPU count]")
@click.option("-o", "--output", "outdir", type=click.Path(path_type=Path), required=True,
              help="Output directory: sweep.parquet, sweep.json, sweep.md and runs/LAYOUT/.")
def sweep(config_file, num_gpus, layouts, mode, rank_by, workers, outdir, **values):
    """Run a workload under every valid layout of N GPUs and print a ranked decision table."""
    from emulator.atomic import write_text_atomic
    from emulator.sweep.format import footnotes, sweep_markdown, sweep_table
    from emulator.sweep.run import run_sweep

    cfg = build_config(config_file, **values)
    if not cfg.trace:
        raise ConfigError("no trace given: pass --trace FILE or set `trace` in --config")
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers {workers} must be at least 1")
    only = None if layouts.strip() == "auto" else [s for s in layouts.split(",") if s.strip()]
    console = Console()
    if not console.is_terminal:  # piped into a file: do not wrap the table at 80 columns
        console = Console(width=160)
    err = Console(stderr=True)
    result = run_sweep(cfg, num_gpus, outdir, mode=mode, layouts=only, rank_by=rank_by,
                       workers=workers,
                       on_done=lambda row: err.print(f"  {row['layout']}: done in "
                                                     f"{row['wall_s']:.1f} s"))
    console.print(sweep_table(result))
    for note in footnotes(result):
        console.print(f"[dim]{note}[/]")
    write_text_atomic(Path(outdir) / "sweep.md", sweep_markdown(result))
    console.print(f"written: {outdir}/sweep.parquet, sweep.md, runs/")


@click.command()
@click.argument("outdir", type=click.Path(path_type=Path))
@click.option("--predicted", type=click.Path(path_type=Path), default=None,
              help="A simulated run directory to plot against OUTDIR's measured (emulated) run.")
@click.option("-o", "--output", "output", type=click.Path(path_type=Path), default=None,
              help="HTML file to write [default: OUTDIR/report.html].")
def report(outdir, predicted, output):
    """Write one self-contained HTML report (plots inline) of a run or validation directory."""
    from emulator.metrics.report import write_report

    path = write_report(outdir, predicted=predicted, output=output)
    Console().print(f"written: {path}")


commands = [sweep, report]
