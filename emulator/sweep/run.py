"""Run one configuration under many layouts and rank them.

Each layout is the base RunConfig with its (dp, tp, pp, ep, attention_dp). Simulations run
in parallel as Ray tasks on a local Ray (one CPU each), or in this process with
``workers=1``; emulations run one after another (each already uses every rank it needs).
Every layout's run directory is written under ``OUTDIR/runs/NAME`` (tables, summary,
timeline), the ranked table as ``OUTDIR/sweep.parquet`` (one row per layout run) and the
skipped layouts and settings as ``OUTDIR/sweep.json``.

Ranking: by ``rank_by`` (``drain``: drain time, ascending; ``throughput``: output tokens per
second, descending; ``ttft_p99`` / ``tpot_p99``: ascending); a layout that left requests
unfinished ranks after every layout that finished them all.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa

from emulator.atomic import write_json_atomic
from emulator.config import RunConfig
from emulator.errors import ConfigError
from emulator.metrics.io import RunWriter, write_table_atomic
from emulator.specs import ParallelLayout, get_hardware, get_model
from emulator.sweep.bottleneck import KV_PEAK, MIN_LOSS, name_bottleneck, run_facts
from emulator.sweep.layouts import Skipped, enumerate_layouts, layout_name

Mode = Literal["simulate", "emulate"]
RANK_BY = {"drain": ("drain_time_s", False), "throughput": ("throughput_tokens_per_s", True),
           "ttft_p99": ("ttft_p99_s", False), "tpot_p99": ("tpot_p99_s", False)}
"""--rank-by choice -> (column, larger is better)."""

SWEEP_COLUMNS: tuple[tuple[str, pa.DataType], ...] = (
    ("rank", pa.int32()), ("layout", pa.string()), ("dp", pa.int32()), ("tp", pa.int32()),
    ("pp", pa.int32()), ("ep", pa.int32()), ("attention_dp", pa.bool_()),
    ("num_requests", pa.int64()), ("num_finished", pa.int64()),
    ("drain_time_s", pa.float64()), ("throughput_tokens_per_s", pa.float64()),
    ("ttft_p99_s", pa.float64()), ("tpot_p99_s", pa.float64()),
    ("kv_peak_usage", pa.float64()), ("num_preemptions", pa.int64()),
    ("comm_share", pa.float64()), ("bubble_fraction", pa.float64()),
    ("imbalance", pa.float64()), ("compute_bound_share", pa.float64()),
    ("bottleneck", pa.string()), ("kv_capacity_tokens_per_replica", pa.int64()),
    ("weight_bytes_per_rank", pa.int64()), ("run_dir", pa.string()), ("wall_s", pa.float64()),
)


@dataclass
class SweepResult:
    rows: list[dict[str, Any]]
    """Ranked, best first; keys: SWEEP_COLUMNS."""
    skipped: list[Skipped]
    rank_by: str
    mode: str
    base: RunConfig
    num_gpus: int
    notes: dict[str, Any] = field(default_factory=dict)

    def to_table(self) -> pa.Table:
        schema = pa.schema([pa.field(n, t) for n, t in SWEEP_COLUMNS],
                           metadata={b"emulator.table": b"sweep"})
        return pa.Table.from_pylist(self.rows, schema=schema)


def layout_config(base: RunConfig, layout: ParallelLayout) -> RunConfig:
    return RunConfig(**(base.model_dump() | layout.model_dump()))


def run_one(config: RunConfig, mode: str, run_dir: str) -> dict[str, Any]:
    """Run one layout, write its run directory, return its sweep row (unranked)."""
    from emulator.build import build_run

    tick = time.monotonic()
    writer = RunWriter(run_dir)
    if mode == "simulate":
        from emulator.simulator.run import simulate

        setup = build_run(config)
        tables = simulate(setup)
        nodes = None
    else:
        from emulator.runtime.executor import emulate

        setup = build_run(config, record_slots=True)
        tables = emulate(setup)
        nodes = {"rank_node_ip": tables.extra.pop("nodes", None)}
    summary = writer.finish(requests=tables.requests, steps=tables.steps,
                            collectives=tables.collectives, mode=mode, config=config,
                            nodes=nodes, extra=tables.extra)
    facts = run_facts(tables.steps, tables.collectives, summary)
    m, mem = summary["metrics"], setup.memory
    layout = setup.layout
    return {
        "layout": layout_name(layout), "dp": layout.dp, "tp": layout.tp, "pp": layout.pp,
        "ep": layout.ep, "attention_dp": layout.attention_dp,
        "num_requests": m["num_requests"], "num_finished": m["num_finished"],
        "drain_time_s": m["drain_time_s"], "throughput_tokens_per_s": m["throughput_tokens_per_s"],
        "ttft_p99_s": m["ttft_p99_s"], "tpot_p99_s": m["tpot_p99_s"],
        "kv_peak_usage": m["kv_peak_usage"], "num_preemptions": m["num_preemptions"],
        "comm_share": facts.comm_share, "bubble_fraction": facts.bubble_fraction,
        "imbalance": facts.imbalance, "compute_bound_share": facts.compute_bound_share,
        "bottleneck": name_bottleneck(facts),
        "kv_capacity_tokens_per_replica": mem.kv_capacity_tokens,
        "weight_bytes_per_rank": mem.weight_bytes_per_rank, "run_dir": str(run_dir),
        "wall_s": time.monotonic() - tick,
    }


def rank_rows(rows: list[dict[str, Any]], rank_by: str) -> list[dict[str, Any]]:
    column, larger_better = RANK_BY[rank_by]

    def key(row):
        value = row[column]
        unfinished = row["num_finished"] < row["num_requests"] or value is None
        return (unfinished, 0.0 if value is None else (-value if larger_better else value),
                row["layout"])

    ranked = sorted(rows, key=key)
    return [{**row, "rank": i + 1} for i, row in enumerate(ranked)]


def _run_parallel(jobs: list[tuple[RunConfig, str]], workers: int,
                  on_done: Callable[[dict], None]) -> list[dict[str, Any]]:
    import ray

    from emulator.runtime.ray_setup import start_ray

    rows = []
    with start_ray(None, num_cpus=workers):
        task = ray.remote(num_cpus=1, max_retries=0)(run_one)
        pending = [task.remote(cfg, "simulate", run_dir) for cfg, run_dir in jobs]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            row = ray.get(done[0])
            rows.append(row)
            on_done(row)
    return rows


def run_sweep(base: RunConfig, num_gpus: int, outdir: str | Path, *, mode: Mode = "simulate",
              layouts: list[str] | None = None, rank_by: str = "drain",
              workers: int | None = None,
              on_done: Callable[[dict], None] = lambda row: None) -> SweepResult:
    """Enumerate (or take ``layouts``), run each, rank, write ``sweep.parquet`` and
    ``sweep.json`` under ``outdir``; see the module docstring."""
    if rank_by not in RANK_BY:
        raise ConfigError(f"--rank-by {rank_by!r}: use one of {', '.join(RANK_BY)}")
    if mode not in ("simulate", "emulate"):
        raise ConfigError(f"--mode {mode!r}: use simulate or emulate")
    model, hardware = get_model(base.model), get_hardware(base.hardware)
    valid, skipped = enumerate_layouts(model, hardware, num_gpus,
                                       gpu_memory_utilization=base.gpu_memory_utilization,
                                       block_size=base.block_size, only=layouts)
    if not valid:
        reasons = "; ".join(f"{s.name}: {s.reason}" for s in skipped[:3])
        raise ConfigError(f"no layout of {num_gpus} GPUs can run {model.name} on "
                          f"{hardware.name}: {reasons}")
    # Absolute paths: Ray task workers need not share this process's working directory.
    base = base.model_copy(update={k: Path(v).resolve() for k, v in base.model_dump().items()
                                   if isinstance(v, Path)})
    outdir = Path(outdir).resolve()
    jobs = [(layout_config(base, lay), str(outdir / "runs" / layout_name(lay))) for lay in valid]
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    if mode == "simulate" and workers > 1 and len(jobs) > 1:
        rows = _run_parallel(jobs, workers, on_done)
    else:
        rows = []
        with contextlib.ExitStack() as stack:
            if mode == "emulate":  # one Ray for all layouts (emulate() reuses it)
                from emulator.runtime.ray_setup import start_ray
                stack.enter_context(start_ray(base.address))
            for cfg, run_dir in jobs:
                rows.append(run_one(cfg, mode, run_dir))
                on_done(rows[-1])
    result = SweepResult(rows=rank_rows(rows, rank_by), skipped=skipped, rank_by=rank_by,
                         mode=mode, base=base, num_gpus=num_gpus,
                         notes={"kv_peak_threshold": KV_PEAK, "min_loss": MIN_LOSS})
    write_table_atomic(outdir / "sweep.parquet", result.to_table())
    write_json_atomic(outdir / "sweep.json", {
        "mode": mode, "num_gpus": num_gpus, "rank_by": rank_by,
        "config": base.model_dump(mode="json"),
        "skipped": [{"layout": s.name, "reason": s.reason} for s in skipped],
        "bottleneck_rule": result.notes})
    return result
