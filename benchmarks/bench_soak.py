"""Soak: a long, dilated emulation of a slice of the Azure conversation trace at DP=2, with the
resident memory of every process of the run sampled throughout.

What it runs: the first --requests requests of traces/azure-conv-500.arrow (Azure LLM
inference 2023, conversation; real arrivals), llama-3.1-8b on h100, DP=2 (x --tp), on an
embedded local Ray, with the records checkpointed to a temp dir every
--checkpoint-interval-s exactly as `emulator emulate` does (RunWriter.flush_partial) and
written complete at the end. The dilation is chosen so that the run lasts about --duration
host seconds: the simulator prices the same slice first (seconds), and
dilation = duration / simulated drain time.

What it prints (ratios, as the benchmarks' house rule asks):
  - RSS growth after warm-up, per process class and in total: (RSS at the end - RSS at the
    end of warm-up) / RSS at the end of warm-up, and the same for the post-warm-up peak.
    Warm-up is the first --warmup-fraction of the run (Ray, torch and the KV pool settle,
    the scheduler reaches its steady batch). Classes: the driver (this process), the
    Worker actors (one per rank), and Ray's own processes (raylet, GCS, agents, idle
    workers: every other descendant of this process). RSS is VmRSS from /proc.
    Target: total growth under 10%.
  - the emulated drain time over the simulated one (same slice, same config): a check that
    the long run stayed faithful, not a speed figure;
  - what the checkpoints cost: count, total and largest time the loop waited for one, as a
    fraction of the run.

Usage: .venv/bin/python benchmarks/bench_soak.py [--duration 180] [--tp 1]
       (about 75 minutes for the figure in the report: --duration 4500)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
from rich.console import Console
from rich.table import Table

from emulator.build import build_run
from emulator.config import build_config
from emulator.metrics.io import RunWriter
from emulator.metrics.summary import compute_metrics
from emulator.runtime.cluster import WorkerGroup
from emulator.runtime.executor import Emulation
from emulator.runtime.ray_setup import start_ray
from emulator.simulator.run import simulate

ROOT = Path(__file__).resolve().parents[1]
TRACE = ROOT / "traces" / "azure-conv-500.arrow"
CLASSES = ("driver", "workers", "ray", "total")


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0  # the process ended


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


@dataclass
class Sampler:
    """Samples the RSS of the driver, the worker pids and Ray's other processes."""

    worker_pids: list[int]
    interval_s: float
    times_s: list[float] = field(default_factory=list)
    rows: list[tuple[int, int, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def sample(self) -> None:
        me = os.getpid()
        others = _descendants(me) - set(self.worker_pids)
        self.times_s.append(time.monotonic())
        self.rows.append((_rss_bytes(me), sum(map(_rss_bytes, self.worker_pids)),
                          sum(map(_rss_bytes, others))))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> Sampler:
        self.sample()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def table(self) -> np.ndarray:
        """[samples, 4]: driver, workers, ray, total bytes."""
        rss = np.array(self.rows, dtype=np.float64)
        return np.column_stack([rss, rss.sum(axis=1)])


def _pid(_actor) -> int:
    return os.getpid()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=180.0,
                        help="target host seconds of the emulation (default 180)")
    parser.add_argument("--requests", type=int, default=500, help="trace slice (default 500)")
    parser.add_argument("--tp", type=int, default=1, help="TP per replica (default 1)")
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--warmup-fraction", type=float, default=0.2)
    parser.add_argument("--sample-interval-s", type=float, default=5.0)
    parser.add_argument("--checkpoint-interval-s", type=float, default=30.0)
    args = parser.parse_args()
    console = Console()

    base = dict(trace=TRACE, model=args.model, hardware="h100", dp=2, tp=args.tp,
                max_requests=args.requests, timeout_s=60.0, router="least_outstanding")
    sim = simulate(build_run(build_config(**base)))
    sim_drain_s = compute_metrics(sim.requests, sim.steps)["drain_time_s"]
    sim_steps = int((sim.steps["stage"].to_numpy() == 0).sum())
    dilation = args.duration / sim_drain_s
    setup = build_run(build_config(**base, dilation=dilation), record_slots=True)
    console.print(f"slice: {args.requests} requests, simulated drain {sim_drain_s:.1f} s, "
                  f"{sim_steps} simulated steps; "
                  f"dilation {dilation:.2f} for ~{args.duration:.0f} s")

    outdir = Path(tempfile.mkdtemp(prefix="soak-"))
    writer = RunWriter(outdir)
    checkpoint_s: list[float] = []

    def checkpoint(tables) -> None:
        tick = time.monotonic()
        writer.flush_partial(requests=tables.requests, steps=tables.steps,
                             collectives=tables.collectives, mode="emulate",
                             config=setup.config, extra=tables.extra)
        checkpoint_s.append(time.monotonic() - tick)

    with start_ray(None, num_cpus=4):
        with WorkerGroup(setup.layout, backend="gloo", timeout_s=60.0) as group:
            pids = ray.get([a.__ray_call__.remote(_pid) for a in group.actors])
            emu = Emulation(setup, group)
            emu.allocate()
            with Sampler(pids, args.sample_interval_s) as sampler:
                emu.run(on_checkpoint=checkpoint,
                        checkpoint_interval_s=args.checkpoint_interval_s)
            tables = emu.tables()
    writer.finish(requests=tables.requests, steps=tables.steps,
                  collectives=tables.collectives, mode="emulate", config=setup.config,
                  extra=tables.extra)
    _report(console, args, sampler, emu, tables, sim_drain_s, sim_steps, checkpoint_s, outdir)


def _report(console, args, sampler, emu, tables, sim_drain_s, sim_steps, checkpoint_s,
            outdir) -> None:
    rss = sampler.table()
    t = np.array(sampler.times_s) - sampler.times_s[0]
    wall_s = t[-1]
    warm = int(np.searchsorted(t, args.warmup_fraction * wall_s))
    warm = min(warm, len(t) - 1)
    table = Table(title=f"RSS (MiB) over {wall_s / 60:.1f} min, {len(t)} samples, base = "
                        f"after the {t[warm]:.0f} s warm-up")
    # MiB at start, after warm-up (base), at the end, post-warm-up peak; growth vs base
    for col in ("process", "start", "base", "end", "peak", "end/base-1", "peak/base-1"):
        table.add_column(col, justify="right")
    mib = 2.0 ** 20
    for i, name in enumerate(CLASSES):
        after = rss[warm, i]
        table.add_row(name, f"{rss[0, i] / mib:.0f}", f"{after / mib:.0f}",
                      f"{rss[-1, i] / mib:.0f}", f"{rss[warm:, i].max() / mib:.0f}",
                      f"{rss[-1, i] / after - 1:+.2%}", f"{rss[warm:, i].max() / after - 1:+.2%}")
    console.print(table)
    metrics = compute_metrics(tables.requests, tables.steps)
    st = emu.stats
    console.print(
        f"steps {st.num_steps} (simulated {sim_steps}), requests finished {metrics['num_finished']}/"
        f"{tables.requests.num_rows}; emulated / simulated drain time: "
        f"{metrics['drain_time_s']:.1f} / {sim_drain_s:.1f} s = "
        f"{metrics['drain_time_s'] / sim_drain_s:.3f}")
    cp = np.array(checkpoint_s or [0.0])
    console.print(
        f"checkpoints: {len(checkpoint_s)}, total {cp.sum():.2f} s "
        f"({cp.sum() / wall_s:.2%} of the run), largest {cp.max():.3f} s; "
        f"records in {outdir} ({sum(p.stat().st_size for p in outdir.iterdir()) / mib:.1f} MiB)")
    total_growth = rss[-1, 3] / rss[warm, 3] - 1
    verdict = "[green]under[/]" if total_growth < 0.10 else "[red]over[/]"
    console.print(f"total RSS growth after warm-up {total_growth:+.2%}: {verdict} the 10% target")


if __name__ == "__main__":
    main()
