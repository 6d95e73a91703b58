"""Simulator speed and memory, each figure as a ratio against references run in the same
process (machines are noisy; absolute figures only make sense next to their reference).

Cases:
  (a) azure   the Azure LLM inference 2023 conversation trace (19,366 requests, real
              arrivals), llama-3.1-70b, TP=4 on h100;
  (b) reason  a 10,000-request offline reasoning batch (synth_trace lengths="reasoning",
              arrival="batch", seed 0), llama-3.1-8b on one h200.

For each case:
  - the headline run: fast-forwarded simulation (the default of `emulator simulate`);
  - reference (i): the same simulation stepping every decode (fast_forward=False). For (b)
    stepping all 10,000 requests takes minutes, so the reference runs on the first
    --ref-requests requests (1,000 by default), where the fast-forwarded run is timed too:
    the speed-up is measured on equal work, and the headline's per-request rate is set
    against the stepping per-request rate of the prefix (a smaller batch has less
    preemption churn per request, so that second ratio is indicative only);
  - reference (ii): a bare-Python floor, a heapq push/pop loop over as many events as the
    run handled (same 5-tuple events as the engine), in events per second.

"Events" are the engine's heap events (step/run completions and scheduling wake-ups) plus
the arrivals, which the engine merges without the heap (Simulation.num_events).
Decode tokens are the sum of steps.num_decode_tokens (recomputed tokens after a preemption
count as prefill). Peak memory is the tracemalloc peak (Python and numpy allocations)
during the simulation, excluding the trace load, measured in a separate, untimed pass
because tracing slows the run down.

Usage: .venv/bin/python benchmarks/bench_simulator.py [--quick]
"""

from __future__ import annotations

import argparse
import heapq
import os
import platform
import sys
import tempfile
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from emulator.build import RunSetup, build_run
from emulator.config import build_config
from emulator.simulator.engine import Simulation
from emulator.simulator.run import request_table
from emulator.trace.importers import import_azure
from emulator.trace.io import write_trace
from emulator.trace.synth import synth_trace

ROOT = Path(__file__).resolve().parents[1]
AZURE_CONV = ROOT.parent / "shared/data/traces/azure-llm-2023/AzureLLMInferenceTrace_conv.csv"
VIDUR_NOTE = "Vidur: ~58 s on this trace after a 39-minute predictor training (reported, not measured here)"


@dataclass
class Measure:
    label: str
    num_requests: int
    wall_s: float
    num_events: int
    num_steps: int
    num_decode_tokens: int
    drain_time_s: float
    peak_bytes: int | None = None

    @property
    def requests_per_s(self) -> float:
        return self.num_requests / self.wall_s

    @property
    def decode_tokens_per_s(self) -> float:
        return self.num_decode_tokens / self.wall_s

    @property
    def events_per_s(self) -> float:
        return self.num_events / self.wall_s


def simulate_once(setup: RunSetup, *, fast_forward: bool, label: str,
                  trace_memory: bool = False) -> Measure:
    """One simulation, as emulator.simulator.run.simulate does it (tables included), but
    keeping the Simulation to read its event count."""
    if trace_memory:
        tracemalloc.start()
    t0 = time.perf_counter()
    requests = setup.new_requests()
    sim = Simulation(requests, setup.new_schedulers(requests), setup.new_router(), setup.cost,
                     fast_forward=fast_forward)
    sim.run()
    req_table = request_table(requests).to_table()
    steps = sim.steps.to_table()
    wall_s = time.perf_counter() - t0
    peak = None
    if trace_memory:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    finish = req_table.column("finish_s").to_numpy()
    arrival = req_table.column("arrival_s").to_numpy()
    return Measure(label=label, num_requests=req_table.num_rows, wall_s=wall_s,
                   num_events=sim.num_events,  # heap events + arrivals
                   num_steps=steps.num_rows,
                   num_decode_tokens=int(np.sum(steps.column("num_decode_tokens").to_numpy())),
                   drain_time_s=float(np.nanmax(finish) - arrival.min()), peak_bytes=peak)


def heapq_floor(num_events: int) -> float:
    """Events per second of a bare heapq push/pop loop with the engine's event tuples."""
    heap: list[tuple] = []
    push, pop = heapq.heappush, heapq.heappop
    t0 = time.perf_counter()
    t = 0.0
    for seq in range(num_events):
        push(heap, (t, seq, 0, 0, None))
        t = pop(heap)[0] + 0.01
    return num_events / (time.perf_counter() - t0)


def _setup(trace_path: Path, *, max_requests: int | None = None, **cfg) -> RunSetup:
    return build_run(build_config(trace=trace_path, max_requests=max_requests, **cfg))


def run_case(name: str, trace_path: Path, cfg: dict, ref_requests: int | None) -> dict:
    """Headline, references and memory pass of one case."""
    setup = _setup(trace_path, **cfg)
    head = simulate_once(setup, fast_forward=True, label="fast-forward")
    if ref_requests is None:
        ff_ref = head
        step = simulate_once(setup, fast_forward=False, label="stepping")
    else:
        small = _setup(trace_path, max_requests=ref_requests, **cfg)
        ff_ref = simulate_once(small, fast_forward=True, label=f"fast-forward, first {ref_requests}")
        step = simulate_once(small, fast_forward=False, label=f"stepping, first {ref_requests}")
    floor = heapq_floor(head.num_events)
    head.peak_bytes = simulate_once(setup, fast_forward=True, label="memory",
                                    trace_memory=True).peak_bytes
    return {"name": name, "head": head, "ff_ref": ff_ref, "step": step, "floor": floor}


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f}"


def print_case(console: Console, res: dict) -> None:
    head, ff_ref, step, floor = res["head"], res["ff_ref"], res["step"], res["floor"]
    t = Table(title=res["name"], header_style="bold")
    for col in ("run", "requests", "wall s", "req/s", "decode tok/s", "steps", "events",
                "events/s", "floor ÷ run (per event)", "peak MiB (tracemalloc)"):
        t.add_column(col, justify="left" if col == "run" else "right")
    runs = [head, step] if ff_ref is head else [head, ff_ref, step]
    for m in runs:
        t.add_row(m.label, f"{m.num_requests:,}", f"{m.wall_s:.2f}", f"{m.requests_per_s:,.0f}",
                  f"{m.decode_tokens_per_s:,.0f}", f"{m.num_steps:,}", f"{m.num_events:,}",
                  f"{m.events_per_s:,.0f}", f"{floor / m.events_per_s:,.0f}x",
                  _mib(m.peak_bytes))
    t.add_row("bare heapq loop (floor)", "", "", "", "", "", f"{head.num_events:,}",
              f"{floor:,.0f}", "1x", "")
    console.print(t)
    same = ff_ref.drain_time_s - step.drain_time_s
    console.print(f"  fast-forward / stepping on equal work: {step.wall_s / ff_ref.wall_s:.2f}x "
                  f"faster (drain times differ by {same:.3g} s of {step.drain_time_s:,.1f} s)")
    if ff_ref is not head:
        console.print(f"  headline per-request rate / stepping per-request rate on the prefix: "
                      f"{head.requests_per_s / step.requests_per_s:.2f}x (indicative: batch sizes differ)")
    console.print(f"  simulated steps per event: {head.num_steps / head.num_events:.1f} "
                  f"(stepping: {step.num_steps / step.num_events:.1f})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes for a smoke check (seconds)")
    args = ap.parse_args(argv)
    azure_n = 2000 if args.quick else None
    reason_n, ref_n = (1000, 200) if args.quick else (10_000, 1000)

    console = Console(width=200)
    console.print(f"machine: {platform.machine()}, {os.cpu_count()} cores, "
                  f"Python {platform.python_version()}, numpy {np.__version__}"
                  + ("  (quick mode: smaller sizes)" if args.quick else ""))
    if not AZURE_CONV.exists():
        console.print(f"[red]missing {AZURE_CONV}[/]")
        return 1
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        azure = write_trace(import_azure(AZURE_CONV, num_requests=azure_n), Path(tmp) / "azure.arrow")
        reason = write_trace(synth_trace(num_requests=reason_n, lengths="reasoning",
                                         arrival="batch", seed=0), Path(tmp) / "reason.arrow")
        a = run_case(f"(a) Azure conv trace{' (first 2,000)' if args.quick else ''}, "
                     "llama-3.1-70b, TP=4, h100", azure,
                     {"model": "llama-3.1-70b", "hardware": "h100", "tp": 4}, None)
        print_case(console, a)
        console.print(f"  (a) wall time {a['head'].wall_s:.1f} s on this machine  |  {VIDUR_NOTE}")
        b = run_case(f"(b) offline reasoning batch of {reason_n:,} (seed 0), llama-3.1-8b, one h200",
                     reason, {"model": "llama-3.1-8b", "hardware": "h200"}, ref_n)
        print_case(console, b)
    console.print(f"total benchmark wall time: {time.perf_counter() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
