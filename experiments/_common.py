"""Shared helpers of the experiment scripts: build a synthetic trace, simulate one config
through the Python API, derive the figures the tables print, and spell out the equivalent
CLI commands so a reader can reproduce any row with `emulator simulate`."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from rich.console import Console
from rich.table import Table

from emulator.build import build_run
from emulator.config import build_config
from emulator.metrics.format import format_seconds
from emulator.metrics.summary import compute_metrics
from emulator.simulator.run import simulate
from emulator.trace.io import write_trace
from emulator.trace.synth import synth_trace

console = Console(width=200)


def write_reasoning_batch(directory: Path, num_requests: int, seed: int) -> Path:
    """An offline reasoning batch (all requests at t = 0) written as Arrow IPC."""
    trace = synth_trace(num_requests=num_requests, lengths="reasoning", arrival="batch", seed=seed)
    return write_trace(trace, Path(directory) / f"reasoning-{num_requests}-seed{seed}.arrow")


def synth_command(num_requests: int, seed: int) -> str:
    return (f"emulator trace synth --kind reasoning --arrival batch --num-requests {num_requests} "
            f"--seed {seed} -o reasoning.arrow")


def simulate_command(settings: dict[str, Any], outdir: str) -> str:
    """The `emulator simulate` command line of ``settings`` (RunConfig field names)."""
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in settings.items())
    return f"emulator simulate --trace reasoning.arrow {flags} -o {outdir}"


@dataclass
class Row:
    """One simulated configuration: its settings, summary metrics and derived figures."""

    settings: dict[str, Any]
    metrics: dict[str, Any]
    extra: dict[str, Any]
    requests: pa.Table
    steps: pa.Table
    wall_s: float

    @property
    def comm_share(self) -> float:
        """Communication share of the summed step time (TP all-reduces; the engine keeps the
        PP activation transfer out of the per-stage rows, so PP shows none here)."""
        total = self.metrics["compute_s"] + self.metrics["comm_s"]
        return self.metrics["comm_s"] / total if total > 0 else 0.0

    @property
    def busy_share(self) -> float:
        """Busy time of all (replica, stage) pairs over (replicas x stages x drain time):
        1 - busy_share is time a stage or replica sat idle (pipeline bubbles, replicas that
        finished early)."""
        start = self.steps.column("start_s").to_numpy()
        end = self.steps.column("end_s").to_numpy()
        slots = self.settings.get("dp", 1) * self.settings.get("pp", 1)
        drain = self.metrics["drain_time_s"]
        return float(np.sum(end - start)) / (slots * drain) if drain else 0.0

    @property
    def mean_batch(self) -> float:
        """Time-weighted mean requests per step (per stage row), over all replicas."""
        dur = self.steps.column("end_s").to_numpy() - self.steps.column("start_s").to_numpy()
        n = self.steps.column("num_requests").to_numpy()
        return float(np.sum(n * dur) / np.sum(dur)) if np.sum(dur) > 0 else 0.0

    @property
    def recompute_ratio(self) -> float:
        """Prefill tokens computed beyond each prompt once (recompute after preemption),
        per output token: sum of stage-0 num_prefill_tokens minus the prompt tokens, over
        the output tokens. 0 without preemption."""
        stage0 = self.steps.column("stage").to_numpy() == 0
        prefill = int(self.steps.column("num_prefill_tokens").to_numpy()[stage0].sum())
        prompt = int(self.requests.column("prompt_tokens").to_numpy().sum())
        output = int(self.requests.column("output_tokens").to_numpy().sum())
        return (prefill - prompt) / output if output else 0.0

    def per_replica(self) -> list[dict[str, float]]:
        """Per DP replica: requests, output tokens, drain time (last finish - first arrival
        of the run) and preemptions, from requests.parquet's replica column."""
        rep = self.requests.column("replica").to_numpy()
        finish = self.requests.column("finish_s").to_numpy()
        first_arrival = float(self.requests.column("arrival_s").to_numpy().min())
        out = self.requests.column("output_tokens").to_numpy()
        pre = self.requests.column("num_preemptions").to_numpy()
        rows = []
        for r in range(self.settings.get("dp", 1)):
            sel = rep == r
            rows.append({"replica": r, "num_requests": int(sel.sum()),
                         "output_tokens": int(out[sel].sum()),
                         "longest_output_tokens": int(out[sel].max()) if sel.any() else 0,
                         "drain_time_s": float(np.nanmax(finish[sel]) - first_arrival),
                         "num_preemptions": int(pre[sel].sum())})
        return rows


def run(trace: Path, **settings: Any) -> Row:
    """Simulate ``settings`` (RunConfig fields) on ``trace`` with the default fast-forward."""
    t0 = time.perf_counter()
    tables = simulate(build_run(build_config(trace=trace, **settings)))
    wall = time.perf_counter() - t0
    return Row(settings=settings, metrics=compute_metrics(tables.requests, tables.steps),
               extra=tables.extra, requests=tables.requests, steps=tables.steps, wall_s=wall)


def fmt_s(value: float | None) -> str:
    return format_seconds(value)


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def new_table(title: str, columns: list[str]) -> Table:
    table = Table(title=title, header_style="bold")
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    return table
