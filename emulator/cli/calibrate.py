"""`emulator bench collectives`, `emulator calibrate` and `emulator validate`: parse flags,
call one function, print a table."""

from __future__ import annotations

import socket
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from emulator.cli.options import COMMON_FIELDS, EMULATION_FIELDS, config_options
from emulator.metrics.format import format_seconds
from emulator.runtime.awake import HostMode

QUICK = {"min_bytes": "1K", "max_bytes": "1M", "iters": 5}


def _bench_options(func):
    for opt in reversed([
        click.option("--ops", default="all_reduce,all_to_all,send_recv,all_gather",
                     show_default=True, help="Comma-separated: all_reduce, all_gather, "
                     "all_to_all, send_recv."),
        click.option("--min-bytes", default="8", show_default=True,
                     help="Smallest size (K/M/G suffixes, powers of 1024)."),
        click.option("--max-bytes", default="64M", show_default=True, help="Largest size."),
        click.option("--world", default="2", show_default=True,
                     help="Comma-separated group sizes; keep ranks <= cores for timing "
                     "(larger worlds share cores and are noisy)."),
        click.option("--iters", default=40, show_default=True,
                     help="Timed iterations per size (fewer above 8 MiB, at least 3)."),
        click.option("--quick", is_flag=True, help="CI smoke range: 1K..1M, 5 iterations."),
        click.option("--spread", is_flag=True, help="Let Ray place ranks on any node "
                     "(measures 'inter' placement on a multi-node cluster)."),
        click.option("--address", default=None, help="Ray cluster to join; default local."),
        click.option("--keep-awake", type=click.Choice(["auto", "on", "off"]), default="auto",
                     show_default=True, help="Idle-priority spinners per CPU while measuring "
                     "(as `emulate --keep-awake`; measure the way the emulation will run)."),
        click.option("--rank-priority", type=click.Choice(["auto", "realtime", "normal"]),
                     default="auto", show_default=True, help="CPU priority of the ranks "
                     "while measuring (as `emulate --rank-priority`)."),
        click.option("--pin-ranks", type=click.Choice(["auto", "on", "off"]), default="auto",
                     show_default=True, help="Pin each rank to a CPU of its own while "
                     "measuring (as `emulate --pin-ranks`)."),
        click.option("--driver-priority", type=click.Choice(["auto", "realtime", "normal"]),
                     default="auto", show_default=True, help="CPU priority of the driver "
                     "while measuring (as `emulate --driver-priority`)."),
    ]):
        func = opt(func)
    return func


def _run_bench(ops, min_bytes, max_bytes, world, iters, quick, spread, address, keep_awake,
               rank_priority, pin_ranks, driver_priority):
    from emulator.calibrate.bench import parse_size, run_bench, sizes_between

    if quick:
        min_bytes, max_bytes, iters = QUICK["min_bytes"], QUICK["max_bytes"], QUICK["iters"]
    sizes = sizes_between(parse_size(min_bytes), parse_size(max_bytes),
                          factor=4 if quick else 2)
    worlds = [int(w) for w in str(world).split(",") if w.strip()]
    console = Console(stderr=True)
    return run_bench([o.strip() for o in ops.split(",")], sizes, worlds, num_iters=iters,
                     spread=spread, address=address,
                     host_mode=HostMode(keep_awake=keep_awake, rank_priority=rank_priority,
                                        pin_ranks=pin_ranks,
                                        driver_priority=driver_priority),
                     on_row=lambda op, n, b, t: console.print(
                         f"  {op:<10} n={n} {b:>10} B {format_seconds(t)}", highlight=False))


def _bench_table(summary) -> Table:
    table = Table(title="collective microbenchmark (median of iterations)")
    for name in ("op", "ranks", "place", "size (B)", "iters", "time", "algbw (GB/s)",
                 "busbw (GB/s)"):
        table.add_column(name, justify="left" if name in ("op", "place") else "right")
    for r in summary.to_pylist():
        table.add_row(r["op"], str(r["group_size"]), r["placement"], f"{r['bytes']:,}",
                      str(r["num_iters"]), format_seconds(r["time_s"]),
                      f"{r['algbw_bytes_per_s'] / 1e9:.3f}", f"{r['busbw_bytes_per_s'] / 1e9:.3f}")
    return table


@click.group()
def bench() -> None:
    """Microbenchmarks on the current Ray cluster (local by default)."""


@bench.command("collectives")
@_bench_options
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Write the per-iteration times as Parquet (default: bench-collectives.parquet).")
def collectives(output, **kw):
    """Time collectives over message sizes, nccl-tests style (size, time, algbw, busbw)."""
    from emulator.calibrate.bench import summarize
    from emulator.metrics.io import write_table_atomic

    raw = _run_bench(**kw)
    output = output or Path("bench-collectives.parquet")
    write_table_atomic(output, raw)
    Console(width=120).print(_bench_table(summarize(raw)))
    click.echo(f"per-iteration times: {output}")


@click.command()
@_bench_options
@click.option("--from-bench", type=click.Path(path_type=Path, exists=True), default=None,
              help="Fit a saved `bench collectives` Parquet instead of benchmarking.")
@click.option("--no-host-probe", is_flag=True,
              help="Skip measuring the emulator host's per-step overheads.")
@click.option("--name", default=None, help="Profile name (default: the host name).")
@click.option("--line-only", is_flag=True,
              help="Price every size with the fitted line (default: the measured per-size "
              "medians inside the measured range, the line outside).")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Profile JSON to write (use with simulate/validate --comm-profile).")
def calibrate(output, from_bench, no_host_probe, name, line_only, **kw):
    """Fit alpha-beta lines per op, group size and placement (and the host overheads)."""
    from emulator.calibrate.run import calibrate as run

    raw = None
    if from_bench is not None:
        import pyarrow.parquet as pq
        raw = pq.read_table(from_bench)
    else:
        raw = _run_bench(**{k: kw[k] for k in ("ops", "min_bytes", "max_bytes", "world",
                                               "iters", "quick", "spread", "address",
                                               "keep_awake", "rank_priority",
                                               "pin_ranks", "driver_priority")})
    profile, points = run(raw, name=name or socket.gethostname(),
                          host_probe=not no_host_probe, address=kw["address"], output=output,
                          host_mode=HostMode(keep_awake=kw["keep_awake"],
                                             rank_priority=kw["rank_priority"],
                                             pin_ranks=kw["pin_ranks"],
                                             driver_priority=kw["driver_priority"]),
                          measured_curve=not line_only)
    table = Table(title=f"fit of {profile.name}: alpha + bytes x (beta + gamma)")
    for col in ("op", "ranks", "place", "alpha", "beta (ns/B)", "gamma (ns/B)",
                "prices with"):
        table.add_column(col, justify="left" if col in ("op", "place", "prices with")
                         else "right")
    for e in profile.entries:
        curve = (f"medians from {e.pieces[0].from_bytes:,.0f} B, line below"
                 if e.pieces else "line")
        table.add_row(e.op, str(e.group_size), e.placement, format_seconds(e.alpha_s),
                      f"{e.beta_s_per_byte * 1e9:.4f}", f"{e.gamma_s_per_byte * 1e9:.4f}",
                      curve)
    console = Console(width=120)
    console.print(table)
    errors = Table(title="fit error per point: (fit - median) / median")
    for col in ("op", "ranks", "size (B)", "measured", "fit", "error"):
        errors.add_column(col, justify="left" if col == "op" else "right")
    for p in points:
        errors.add_row(p.op, str(p.group_size), f"{p.num_bytes:,}", format_seconds(p.measured_s),
                       format_seconds(p.predicted_s), f"{p.error * 100:+.1f}%")
    console.print(errors)
    if profile.host is not None:
        console.print(f"host overheads: {profile.host.model_dump()}")
    click.echo(f"profile: {output}")


@click.command()
@config_options(COMMON_FIELDS + EMULATION_FIELDS)
@click.option("-o", "--output", "outdir", type=click.Path(path_type=Path), required=True,
              help="Output directory: emulate/, simulate/ (simulate-thermometer/), "
              "validation.json, validation.png.")
@click.option("--host-probe/--no-host-probe", default=True, show_default=True,
              help="Re-measure the host overheads just before and just after emulating "
              "(they follow the machine's load) and price with their mean; the collective "
              "lines come from --comm-profile, except that with TP the logits all-gather's "
              "is scaled by what the two probes measured at the run's size.")
@click.option("--thermometer/--no-thermometer", default=True, show_default=True,
              help="With TP: every stage repeats its middle layer's first all-reduce back to "
              "back in every step, and the group collectives are priced with the speed these "
              "probes measured. With PP: scale the "
              "probed round trip between a micro-batch's steps by the driver's busy time per "
              "step in the run over the probe's. The as-calibrated errors are reported "
              "beside.")
@click.option("--reuse-emulation", is_flag=True,
              help="Keep OUTDIR/emulate (do not re-run it); re-simulate and re-report, with "
              "--comm-profile if given (e.g. after re-calibrating) and --no-thermometer "
              "to price as calibrated.")
def validate(config_file, outdir, host_probe, thermometer, reuse_emulation, **values):
    """Emulate and simulate (host profile, same dilation) one trace; report the errors."""
    from emulator.config import build_config
    from emulator.validate.run import revalidate
    from emulator.validate.run import validate as run

    if reuse_emulation:
        report = revalidate(outdir, values.get("comm_profile"), thermometer=thermometer)
    else:
        report = run(build_config(config_file, **values), outdir, host_probe=host_probe,
                     thermometer=thermometer)
    console = Console(width=120)
    table = Table(title=f"validation: {outdir}")
    table.add_column("metric")
    table.add_column("signed error", justify="right")
    for key in ("step_time_median_error", "step_time_error_of_medians", "drain_time_error",
                "collective_median_error_small",
                "collective_median_error_large", "ttft_p50_error", "ttft_p90_error",
                "tpot_p50_error", "tpot_p90_error", "e2e_p50_error", "e2e_p90_error",
                "step_time_mape", "step_time_bias", "noise_floor_mape"):
        v = report.get(key)
        table.add_row(key, "-" if v is None else f"{v * 100:+.1f}%")
    console.print(table)
    for g in report["steps_by_kind"]:
        console.print(f"  {g['kind']:<8} batch {g['batch']:<8} n={g['num_steps']:<5} "
                      f"measured {format_seconds(g['measured_median_s'])}  predicted "
                      f"{format_seconds(g['predicted_median_s'])}  "
                      f"{(g['median_error'] or 0) * 100:+.1f}%", highlight=False)
    for r in report["collectives"]["by_op"]:
        medians = r["error_of_medians"]
        console.print(f"  {r['op']:<10} {r['bucket']:<5} n={r['num_instances']:<6} measured "
                      f"{format_seconds(r['measured_median_s'])}  predicted "
                      f"{format_seconds(r['predicted_median_s'])}  "
                      f"{(r['median_error'] or 0) * 100:+.1f}%  (of the medians "
                      f"{'-' if medians is None else f'{medians * 100:+.1f}%'}; "
                      f"{r['num_sizes']} sizes)", highlight=False)
    for op, t in (report.get("thermometer") or {}).items():
        console.print(f"  thermometer {op} median {int(t['bytes']):,} B n={t['num_instances']}: "
                      f"measured {format_seconds(t['measured_median_s'])}, as calibrated "
                      f"{format_seconds(t['predicted_median_s'])}: calls "
                      f"{t['shift_s'] * 1e6:+.1f} µs (target time; median per probe)",
                      highlight=False)
    driver = report.get("driver_thermometer")
    if driver:
        console.print(f"  driver busy per step: run "
                      f"{format_seconds(driver['run_busy_per_step_s'])}, gap probe "
                      f"{format_seconds(driver['probe_busy_per_step_s'])}: round trip "
                      f"x{driver['factor']:.2f} (host time)", highlight=False)
    calibrated = report.get("as_calibrated")
    if calibrated:
        console.print("  as calibrated: " + ", ".join(
            f"{k.replace('_error', '').replace('_', ' ')} "
            + ("-" if calibrated[k] is None else f"{calibrated[k] * 100:+.1f}%")
            for k in ("step_time_median_error", "drain_time_error",
                      "collective_median_error_large")), highlight=False)
    console.print(report["verdict"], highlight=False)


commands = [bench, calibrate, validate]
