"""Emulator fidelity and control overhead, each as a ratio against a reference measured in
the same run (these machines are shared and noisy, so absolute times mean little).

(a) Collective fidelity: the median TP all-reduce time inside emulation steps (host time,
    per rank, exit - entry) divided by the median of a raw ``torch.distributed`` all-reduce
    of the same size and world, timed in two bare processes right after the emulation.
    Target <= 1.10 (project goal: within 2%). The transfer part alone (exit - max entry
    over the ranks, i.e. without waiting for a straggler) is printed too, and so is the
    ratio against raw gloo with the same pattern (each all-reduce after a compute delay of
    the step's median length, waited as the workers wait): on a CPU host a collective right
    after a delay pays the CPU's wake-up, which a raw program with the same delays pays too;
    that ratio isolates what the emulator itself adds.
(b) Control overhead: (wall - sum over steps of the slowest rank's compute delay + collective
    time) / wall, target <= 5% (project goal: 2%); and the per-step overhead divided by a
    bare Ray actor round trip measured in the same Ray; the part between steps divided by
    Ray's own gap between two calls of a bare actor when the next call is already queued
    (the floor of a loop of one call per step); both bare actors run after the emulation,
    with the same idle spinners and at the ranks' priority. The emulation runs ahead
    (RunConfig.run_ahead, the default: the next plan waits on the actors while a step
    runs); the same workload is emulated again without it, on the same workers, and its
    overhead printed beside.

Workload: an offline batch of identical requests (fixed prompt and output lengths), so every
decode step has the same tokens and therefore the same all-reduce size.

    .venv/bin/python benchmarks/bench_emulator.py [--model llama-3.1-8b] [--requests 32]
        [--output-tokens 64] [--dilation 10] [--tp 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def raw_allreduce_median_s(num_bytes: int, world: int, iters: int, delay_s: float = 0.0,
                           spin_s: float = 0.0, realtime: bool = False,
                           cpus: list | None = None) -> float:
    """Median seconds of a gloo all-reduce of num_bytes among `world` bare processes, each
    call preceded by a delay of delay_s (waited like a worker waits: spin_s spun; with
    ``realtime`` the processes run at the ranks' real-time priority; ``cpus``: per rank the
    CPU slot it is pinned to, as the workers were, or None)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = 29000 + os.getpid() % 1000
    cpus = cpus or [None] * world
    procs = [ctx.Process(target=_raw_worker, args=(r, world, port, num_bytes, iters, delay_s,
                                                   spin_s, realtime, cpus[r], queue))
             for r in range(world)]
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join(timeout=60)
    return statistics.median(t for rank_times in results for t in rank_times)


def _raw_worker(rank, world, port, num_bytes, iters, delay_s, spin_s, realtime, cpu_slot,
                queue):
    import torch
    import torch.distributed as dist

    from emulator.runtime.awake import pin_threads, set_realtime
    from emulator.runtime.delay import precise_sleep

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    set_realtime(realtime)
    pin_threads(cpu_slot)
    buf = torch.zeros(num_bytes // 2, dtype=torch.bfloat16)  # as the workers do
    for _ in range(10):
        dist.all_reduce(buf)
    times = []
    for _ in range(iters):
        if delay_s > 0:
            precise_sleep(delay_s, spin_s)
        t0 = time.monotonic()
        dist.all_reduce(buf)
        times.append(time.monotonic() - t0)
    dist.destroy_process_group()
    queue.put(times)


def spinners_note(awake: bool) -> str:
    from emulator.runtime.awake import cpus_available
    return f"{cpus_available()} idle spinners" if awake else "no spinners"


def _bare_actor(realtime: bool):
    """A Ray actor that does nothing of its own (ping; call sleeps and stamps), at the
    ranks' real-time priority when they ran at it."""
    import ray

    @ray.remote(num_cpus=0.01)
    class Bare:
        def realtime(self):
            from emulator.runtime.awake import set_realtime
            return set_realtime(True)

        def ping(self):
            return 0

        def call(self, busy):
            t0 = time.monotonic()
            time.sleep(busy)
            return t0, time.monotonic()

    actor = Bare.remote()
    if realtime:
        ray.get(actor.realtime.remote())
    return actor


def bare_round_trip_s(iters: int = 200, realtime: bool = False) -> float:
    import ray

    echo = _bare_actor(realtime)
    ray.get(echo.ping.remote())
    times = []
    for _ in range(iters):
        t0 = time.monotonic()
        ray.get(echo.ping.remote())
        times.append(time.monotonic() - t0)
    ray.kill(echo)
    return statistics.median(times)


def bare_queued_gap_s(iters: int = 200, busy_s: float = 5e-3, realtime: bool = False) -> float:
    """Ray's own time between two calls of an actor when the next is already queued: an
    actor whose call sleeps ``busy_s`` and stamps its start and end, two calls in flight
    (the caller submits the next as soon as the oldest returns, as the emulator does when it
    runs ahead); the median of (start of call k+1 - end of call k) inside the actor."""
    import ray

    actor = _bare_actor(realtime)
    ray.get(actor.call.remote(0.0))
    refs = [actor.call.remote(busy_s) for _ in range(2)]
    stamps = []
    for _ in range(iters):
        stamps.append(ray.get(refs.pop(0)))
        refs.append(actor.call.remote(busy_s))
    stamps += ray.get(refs)
    ray.kill(actor)
    return statistics.median(b[0] - a[1] for a, b in zip(stamps, stamps[1:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--hardware", default="h100")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--dilation", type=float, default=10.0)
    ap.add_argument("--delay-mode", default="auto", choices=["auto", "sleep", "spin"])
    ap.add_argument("--keep-awake", default="auto", choices=["auto", "on", "off"],
                    help="idle-priority spinners per CPU, in the emulation and (the same "
                    "number) around the raw references")
    ap.add_argument("--rank-priority", default="auto", choices=["auto", "realtime", "normal"],
                    help="CPU priority of the ranks, in the emulation and (as the emulation "
                    "ran) in the raw references")
    ap.add_argument("--pin-ranks", default="auto", choices=["auto", "on", "off"],
                    help="a CPU per rank, in the emulation and (as the emulation ran) in the "
                    "raw references")
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    from emulator.build import build_run
    from emulator.config import build_config
    from emulator.runtime.cluster import WorkerGroup
    from emulator.runtime.executor import Emulation
    from emulator.runtime.ray_setup import start_ray
    from emulator.trace.io import write_trace
    from emulator.trace.synth import synth_trace

    tmp = Path(tempfile.mkdtemp())
    trace_path = tmp / "batch.arrow"
    write_trace(synth_trace(num_requests=args.requests, lengths="fixed", arrival="batch",
                            prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens,
                            seed=0), trace_path)
    cfg = build_config(trace=trace_path, model=args.model, hardware=args.hardware, tp=args.tp,
                       dilation=args.dilation, memory_scale=1e-3, timeout_s=60,
                       delay_mode=args.delay_mode, keep_awake=args.keep_awake,
                       rank_priority=args.rank_priority, pin_ranks=args.pin_ranks)
    setup = build_run(cfg, record_slots=True)
    sync_setup = build_run(cfg.model_copy(update={"run_ahead": False}), record_slots=True)
    from emulator.runtime.awake import IdleSpinners, cpus_available, node_cpus
    with start_ray(None):
        with WorkerGroup(setup.layout, backend="gloo", timeout_s=60) as group:
            emu = Emulation(setup, group)
            emu.allocate()
            emu.run()
            tables = emu.tables()
            sync = Emulation(sync_setup, group)  # the same workload, each plan after its step
            sync.allocate()
            sync.run()
            sync_tables = sync.tables()
        # Ray's own references, under the host conditions the ranks ran in: the same
        # number of idle spinners, the actor at the ranks' priority.
        awake = emu.host_mode[0]["spinners"] > 0
        spin_s, realtime = emu.host_mode[0]["spin_s"], emu.host_mode[0]["realtime"]
        spinners = IdleSpinners()
        spinners.start(cpus_available() if awake else 0)
        try:
            rtt_s = bare_round_trip_s(realtime=realtime)
            queued_gap_s = bare_queued_gap_s(realtime=realtime)
        finally:
            spinners.stop()
    d = args.dilation
    steps = tables.steps
    col = tables.collectives
    decode_steps = set(steps["step"].to_numpy()[steps["num_prefill_tokens"].to_numpy() == 0].tolist())
    op = col["op"].to_numpy(zero_copy_only=False)
    layer = col["layer"].to_numpy()
    in_decode = np.isin(col["step"].to_numpy(), list(decode_steps))
    mask = (op == "all_reduce") & (layer >= 0) & in_decode
    size = int(np.median(col["bytes"].to_numpy()[mask]))
    mask &= col["bytes"].to_numpy() == size
    ar_s = (col["exit_s"].to_numpy() - col["entry_s"].to_numpy())[mask] * d
    transfer_s = col["transfer_s"].to_numpy()[mask] * d
    iters = max(200, min(2000, int(mask.sum())))
    # The raw references run under the same host conditions: the same spinners, and each
    # delayed all-reduce after a compute delay of the step's median per-collective length,
    # waited the way the workers wait, at the priority they ran at.
    spin_s = float("inf") if spin_s is None else spin_s  # None: delays spun whole
    slots = [None if m.get("cpu") is None else node_cpus().index(m["cpu"])
             for m in emu.host_mode]
    decode = steps["num_prefill_tokens"].to_numpy() == 0
    per_op_delay_s = float(np.median(steps["compute_s"].to_numpy()[decode])) * d \
        / (2 * setup.model.num_layers / setup.layout.pp)
    spinners = IdleSpinners()
    spinners.start(cpus_available() if awake else 0)
    try:
        raw_s = raw_allreduce_median_s(size, args.tp, iters, realtime=realtime, cpus=slots)
        raw_delayed_s = raw_allreduce_median_s(size, args.tp, iters, per_op_delay_s, spin_s,
                                               realtime, slots)
    finally:
        spinners.stop()

    def overhead(run, run_steps) -> float:
        busy = (run_steps["compute_s"].to_numpy() + run_steps["comm_s"].to_numpy()) * d
        return run.stats.wall_s - float(busy.sum())

    wall_s = emu.stats.wall_s
    overhead_s = overhead(emu, steps)
    num_steps = emu.stats.num_steps
    sync_s = overhead(sync, sync_tables.steps)

    t = Table(title=f"emulator: {args.model} TP={args.tp}, {args.requests} x "
                    f"({args.prompt_tokens}+{args.output_tokens}) tokens, dilation {d:g}, "
                    f"{num_steps} steps")
    t.add_column("figure")
    t.add_column("value", justify="right")
    t.add_column("reference (same run)", justify="right")
    t.add_column("ratio", justify="right")
    t.add_row(f"all-reduce {size / 1024:.0f} KiB in steps, median (n={mask.sum()})",
              f"{np.median(ar_s) * 1e3:.3f} ms", f"raw gloo {raw_s * 1e3:.3f} ms",
              f"{np.median(ar_s) / raw_s:.3f}")
    t.add_row("  transfer part only (exit - last entry)", f"{np.median(transfer_s) * 1e3:.3f} ms",
              f"raw gloo {raw_s * 1e3:.3f} ms", f"{np.median(transfer_s) / raw_s:.3f}")
    t.add_row(f"  same, against raw gloo after a {per_op_delay_s * 1e3:.2f} ms delay",
              f"{np.median(ar_s) * 1e3:.3f} ms", f"raw gloo {raw_delayed_s * 1e3:.3f} ms",
              f"{np.median(ar_s) / raw_delayed_s:.3f}")
    t.add_row("control overhead (wall - compute - comm)", f"{overhead_s:.3f} s",
              f"wall {wall_s:.3f} s", f"{overhead_s / wall_s:.2%}")
    t.add_row("per-step overhead", f"{overhead_s / num_steps * 1e3:.3f} ms",
              f"bare Ray round trip {rtt_s * 1e3:.3f} ms", f"{overhead_s / num_steps / rtt_s:.2f}")
    span_s = float(((steps["end_s"].to_numpy() - steps["start_s"].to_numpy()) * d).sum())
    busy_s = float(((steps["compute_s"].to_numpy() + steps["comm_s"].to_numpy()) * d).sum())
    t.add_row("  of which inside steps (ranks outside delays and collectives)",
              f"{(span_s - busy_s) / num_steps * 1e3:.3f} ms", "per step", "")
    between_s = (wall_s - span_s) / num_steps
    t.add_row("  of which between steps", f"{between_s * 1e3:.3f} ms",
              f"bare actor, next call queued {queued_gap_s * 1e3:.3f} ms",
              f"{between_s / queued_gap_s:.2f}")
    t.add_row("  same workload without running ahead", f"{sync_s / sync.stats.num_steps * 1e3:.3f} ms",
              f"wall {sync.stats.wall_s:.3f} s: {sync_s / sync.stats.wall_s:.2%}",
              f"{sync_s / sync.stats.num_steps / rtt_s:.2f}")
    Console().print(t)
    print(f"delay mode {args.delay_mode} (spun tail {spin_s:g} s), keep-awake "
          f"{args.keep_awake} ({spinners_note(awake)}); rank priority {args.rank_priority} "
          f"({'realtime' if realtime else 'normal'}); pin ranks {args.pin_ranks} "
          f"(CPUs {[m.get('cpu') for m in emu.host_mode]}); "
          f"load average: {os.getloadavg()}")


if __name__ == "__main__":
    main()
