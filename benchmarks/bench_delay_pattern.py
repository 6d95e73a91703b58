"""Does an all-reduce's wake-up depend on the delays before the one it follows?

The host probe (calibrate.host.measure_host_overhead) prices a TP collective by the delay
right before it, measured in probe steps whose delays all have one length. A run's steps
alternate a short attention delay and a longer MLP delay. This benchmark runs the emulator's
TP=2 ranks (Ray actors, gloo) through probe steps of three kinds, round robin: every delay
short, every delay long, and alternating short (attention) and long (MLP). It prints the
median transfer time (latest entry to latest exit) of the all-reduces that follow each
delay, and as the figure the calls after a short delay in the alternating steps against
those in the uniform short steps (the reference, measured in the same run): their
difference and ratio. The same for the long delay.

    .venv/bin/python benchmarks/bench_delay_pattern.py [--short-ms 1.2] [--long-ms 4]
        [--bytes 237568] [--layers 16] [--steps 16]

The defaults are a TP=2 llama-3.1-8b decode step of 32 sequences at dilation 50 (the
README's validation): ~1.2 ms of attention, ~4 ms of MLP, 232 KiB all-reduces.
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--short-ms", type=float, default=1.2, help="the attention delay")
    ap.add_argument("--long-ms", type=float, default=4.0, help="the MLP delay")
    ap.add_argument("--bytes", type=int, default=237568, help="all-reduce size")
    ap.add_argument("--layers", type=int, default=16, help="layers per probe step")
    ap.add_argument("--steps", type=int, default=16, help="measured steps per kind")
    args = ap.parse_args()

    from emulator.calibrate.host import kv_probe_slots, probe_work
    from emulator.runtime.awake import HostMode
    from emulator.runtime.cluster import WorkerGroup
    from emulator.runtime.ray_setup import start_ray
    from emulator.specs import ParallelLayout

    short, long_ = args.short_ms * 1e-3, args.long_ms * 1e-3
    kinds = {"uniform short": (short, short), "uniform long": (long_, long_),
             "alternating": (short, long_)}
    # per kind: transfer times (s) of the calls after the attention / the MLP delays
    after: dict[str, dict[str, list[float]]] = {k: {"attn": [], "mlp": []} for k in kinds}
    with start_ray(None), WorkerGroup(ParallelLayout(tp=2), backend="gloo",
                                      timeout_s=60.0) as group:
        group.set_host_mode(HostMode())
        slots = kv_probe_slots(group, 32, 32)
        work = {}
        for kind, (attn, mlp) in kinds.items():
            w = probe_work(args.layers, attn, args.bytes, num_tokens=32)
            stage = dataclasses.replace(w.stages[0],
                                        mlp_compute_s=np.full(args.layers, mlp))
            work[kind] = dataclasses.replace(w, stages=[stage])
        for i in range(args.steps + 1):  # round robin: host drift spreads over the kinds
            for kind, w in work.items():
                recs = group.run_replica_step(0, w, slots, 1.0, step_key=(kind, i))
                if i == 0:
                    continue  # warm-up
                entry = np.stack([r.coll_entry_s for r in recs]).max(axis=0)
                exit_ = np.stack([r.coll_exit_s for r in recs]).max(axis=0)
                # embedding all-reduce, then per layer one after its attention delay and
                # one after its MLP delay, then the logits all-gather; layer 0's first
                # follows the KV write and is left out
                per_layer = (exit_ - entry)[1:-1].reshape(args.layers, 2)[1:]
                after[kind]["attn"] += per_layer[:, 0].tolist()
                after[kind]["mlp"] += per_layer[:, 1].tolist()

    med = {k: {d: float(np.median(v)) * 1e6 for d, v in by.items()} for k, by in after.items()}
    print(f"TP=2 all-reduce of {args.bytes:,} B, {args.steps} steps of {args.layers} layers "
          "per kind; median transfer (host us)")
    for kind, (attn, mlp) in kinds.items():
        print(f"  {kind:14s} after attention ({attn * 1e3:.2f} ms) {med[kind]['attn']:6.0f}   "
              f"after MLP ({mlp * 1e3:.2f} ms) {med[kind]['mlp']:6.0f}")
    alt = med["alternating"]
    for delay, ref in (("attn", "uniform short"), ("mlp", "uniform long")):
        base = med[ref][delay]
        print(f"after the {'short' if delay == 'attn' else 'long'} delay, alternating vs "
              f"{ref}: {alt[delay] - base:+.0f} us ({alt[delay] / base:.2f}x)")


if __name__ == "__main__":
    main()
