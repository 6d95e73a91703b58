"""Expert-popularity skew at EP=4: Mixtral-8x7B on 4 emulated H100 ranks (EP over the TP
ranks), routing from uniform to Zipf 1.2 (and Zipf 1.2 with 4 redundant expert copies
placed EPLB-style), measured in the emulator beside the simulator's predictions.

Each point emulates an offline batch of ``--num-requests`` prompts of ``--prompt-tokens``
(prefill steps of 2048 tokens, then one decode step) on a local Ray with gloo, dilation
``--dilation``; then simulates the same config. The table reports the prefill steps (the
compute-bound regime where a rank's extra pairs cost time; at a decode batch of 16 tokens
every rank's expert time is its weight reads):

- imbalance: max / mean (token, expert) pairs per rank, per MoE layer (moe.parquet),
  predicted = the cost model's expectation over sample routings (CostModel.moe_load);
- combine sync-wait: mean over ranks and MoE layers of max(entry) - own entry in the
  combine all-to-all, i.e. waiting for the most loaded rank's experts; predicted = busiest
  minus mean expert time (metrics.moe.predicted_sync_wait_s); dispatch sync-wait is the
  host's noise floor (ranks enter the dispatch after identical work);
- a2a bytes: mean bytes a rank sends to the others per MoE layer (dispatch + combine);
- prefill step: mean step time, emulated (host time / dilation) and simulated.

Each point's run directory (with moe.parquet) is written under ``--out``.

Usage: .venv/bin/python experiments/moe_skew.py [--num-requests 16] [--dilation 50]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from _common import console, fmt_s, new_table
from emulator.build import build_run
from emulator.config import build_config
from emulator.metrics.io import RunWriter
from emulator.metrics.moe import predicted_sync_wait_s
from emulator.runtime.cluster import WorkerGroup
from emulator.runtime.executor import Emulation
from emulator.runtime.ray_setup import start_ray
from emulator.simulator.run import simulate
from emulator.trace.io import write_trace
from emulator.trace.synth import synth_trace

MODEL, HARDWARE, EP = "mixtral-8x7b", "h100", 4
POINTS = (("uniform", 0.0, 0), ("zipf", 0.4, 0), ("zipf", 0.8, 0), ("zipf", 1.2, 0),
          ("zipf", 1.2, 4))
PREFILL_TOKENS = 1024
"""Steps with at least this many tokens count as prefill steps in the table."""


def settings(skew: str, zipf_s: float, redundant: int, args) -> dict:
    return {"model": MODEL, "hardware": HARDWARE, "tp": EP, "ep": EP,
            "max_num_batched_tokens": 2048, "expert_skew": skew, "zipf_s": zipf_s,
            "eplb_redundant_experts": redundant, "routing_seed": args.seed,
            "dilation": args.dilation, "memory_scale": 1e-4, "timeout_s": 120.0}


def emulate_point(trace: Path, cfg_values: dict, outdir: Path) -> dict:
    cfg = build_config(trace=trace, **cfg_values)
    setup = build_run(cfg, record_slots=True)
    with WorkerGroup(setup.layout, backend="gloo", timeout_s=cfg.timeout_s) as group:
        emu = Emulation(setup, group)
        emu.allocate()
        t0 = time.perf_counter()
        emu.run()
        wall_s = time.perf_counter() - t0
    tables = emu.tables()
    moe = emu.moe_records.to_table()
    RunWriter(outdir).finish(requests=tables.requests, steps=tables.steps,
                             collectives=tables.collectives, mode="emulate", config=cfg,
                             extra=tables.extra, moe=moe)
    sim = simulate(build_run(cfg))
    big = moe["num_tokens"].to_numpy() >= PREFILL_TOKENS
    loads = [setup.cost.moe_load(int(t)) for t in moe["num_tokens"].to_numpy()[big]]
    return {
        "wall_s": wall_s,
        "imbalance": moe["imbalance"].to_numpy()[big].mean(),
        "imbalance_pred": np.mean([x.imbalance for x in loads]),
        "combine_wait_s": moe["combine_sync_wait_s"].to_numpy()[big].mean(),
        "combine_wait_pred_s": np.mean([predicted_sync_wait_s(x.busiest_expert_s,
                                                              x.mean_expert_s) for x in loads]),
        "dispatch_wait_s": moe["dispatch_sync_wait_s"].to_numpy()[big].mean(),
        "a2a_bytes": moe["a2a_bytes_sent"].to_numpy()[big].mean(),
        "step_s": _prefill_step_s(tables.steps),
        "step_pred_s": _prefill_step_s(sim.steps),
    }


def _prefill_step_s(steps) -> float:
    big = steps["num_prefill_tokens"].to_numpy() >= PREFILL_TOKENS
    dur = steps["end_s"].to_numpy() - steps["start_s"].to_numpy()
    return float(dur[big].mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--dilation", type=float, default=50.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("/tmp/moe-skew"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    trace = write_trace(synth_trace(num_requests=args.num_requests, lengths="fixed",
                                    arrival="batch", prompt_tokens=args.prompt_tokens,
                                    output_tokens=2, seed=args.seed),
                        args.out / "prefill-batch.arrow")
    t = new_table(f"{MODEL}, EP={EP} over TP ranks, prefill steps of 2048 tokens, dilation "
                  f"{args.dilation:g} (emulated | simulated)",
                  ["routing", "imbalance", "pred", "combine sync-wait", "pred",
                   "dispatch sync-wait", "a2a bytes/rank/layer", "prefill step", "pred",
                   "wall s"])
    with start_ray(None, num_cpus=4):
        for skew, s, redundant in POINTS:
            name = "uniform" if skew == "uniform" else f"zipf {s:g}"
            name += f" +EPLB {redundant}" if redundant else ""
            r = emulate_point(trace, settings(skew, s, redundant, args),
                              args.out / name.replace(" ", "-").replace("+", ""))
            t.add_row(name, f"{r['imbalance']:.2f}", f"{r['imbalance_pred']:.2f}",
                      fmt_s(r["combine_wait_s"]), fmt_s(r["combine_wait_pred_s"]),
                      fmt_s(r["dispatch_wait_s"]), f"{r['a2a_bytes'] / 2**20:.1f} MiB",
                      fmt_s(r["step_s"]), fmt_s(r["step_pred_s"]), f"{r['wall_s']:.0f}")
            console.print(f"done: {name}")
    console.print(t)
    console.print("Emulate one point: emulator trace synth --kind fixed --arrival batch "
                  f"--num-requests {args.num_requests} --prompt-tokens {args.prompt_tokens} "
                  "--output-tokens 2 -o batch.arrow; emulator emulate --trace batch.arrow "
                  f"--model {MODEL} --hardware {HARDWARE} --tp {EP} --ep {EP} "
                  "--max-num-batched-tokens 2048 --expert-skew zipf --zipf-s 1.2 "
                  f"--dilation {args.dilation:g} --memory-scale 1e-4 -o out")
    return 0


if __name__ == "__main__":
    sys.exit(main())
