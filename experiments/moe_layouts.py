"""DeepSeek-R1 (671B MoE, MLA, FP8 weights) on 8 H200: an offline reasoning batch simulated
on the DESIGN's MoE layouts — wide TP, PP x TP, and attention data parallelism with the
experts spread over all ranks (the DeepSeek serving layout) — with uniform and Zipf 1.2
expert popularity where tokens cross an EP all-to-all.

Layouts (8 ranks each):
- TP=8: experts split by TP (ep=1, no all-to-all), and TP=8 with EP=8 over the TP ranks;
- PP=4 x TP=2, ep=1 and EP=2 over the TP ranks of each stage;
- attention-DP=8 with EP=8: 8 replicas with their own KV caches; each MoE layer's EP group
  gathers the tokens of all 8 replicas (the cost model assumes equally sized batches).
  The simulator only: the emulator runs EP over the TP ranks of one replica.

Columns: KV capacity per replica (MLA: 1,152 B per token per layer, not split by TP), drain
time and throughput, TPOT p50, the communication share of step time, and for EP layouts the
predicted per-layer imbalance and busiest-rank expert time of a 256-token decode step.

Usage: .venv/bin/python experiments/moe_layouts.py [--num-requests 256] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from _common import (console, fmt_s, new_table, pct, run, simulate_command, synth_command,
                     write_reasoning_batch)
from emulator.build import build_run
from emulator.config import build_config

MODEL, HARDWARE = "deepseek-r1", "h200"
LAYOUTS = (
    ("TP=8", dict(tp=8)),
    ("TP=8, EP=8", dict(tp=8, ep=8)),
    ("PP=4 x TP=2", dict(tp=2, pp=4)),
    ("PP=4 x TP=2, EP=2", dict(tp=2, pp=4, ep=2)),
    ("attention-DP=8, EP=8", dict(dp=8, tp=1, ep=8, attention_dp=True)),
)
SKEWS = (("uniform", {}), ("zipf 1.2", dict(expert_skew="zipf", zipf_s=1.2)))
DECODE_TOKENS = 256


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    t = new_table(f"{MODEL} on 8 x {HARDWARE}, reasoning batch of {args.num_requests} "
                  "(simulated)", ["layout", "routing", "KV tokens/replica", "drain",
                                  "throughput tok/s", "TPOT p50", "comm share",
                                  f"imbalance @{DECODE_TOKENS}", "busiest expert/layer",
                                  "sim wall s"])
    commands = []
    with tempfile.TemporaryDirectory() as tmp:
        trace = write_reasoning_batch(Path(tmp), args.num_requests, args.seed)
        for name, layout in LAYOUTS:
            for skew_name, skew in SKEWS:
                if skew and layout.get("ep", 1) == 1:
                    continue  # no all-to-all: popularity changes nothing in the model
                settings = {"model": MODEL, "hardware": HARDWARE, **layout, **skew}
                row = run(trace, **settings)
                setup = build_run(build_config(trace=trace, **settings))
                if setup.routing is not None:
                    load = setup.cost.moe_load(DECODE_TOKENS)
                    imb, busiest = f"{load.imbalance:.2f}", fmt_s(load.busiest_expert_s)
                else:
                    imb, busiest = "-", "-"
                m = row.metrics
                t.add_row(name, skew_name if layout.get("ep", 1) > 1 else "-",
                          f"{row.extra['memory']['kv_capacity_tokens_per_replica']:,}",
                          fmt_s(m["drain_time_s"]), f"{m['throughput_tokens_per_s']:,.0f}",
                          fmt_s(m["tpot_p50_s"]), pct(row.comm_share), imb, busiest,
                          f"{row.wall_s:.1f}")
                console.print(f"done: {name} {skew_name} ({row.wall_s:.1f} s)")
                commands.append(simulate_command(settings, f"out/{name}-{skew_name}"
                                                 .replace(" ", "").replace(",", "_")))
    console.print(t)
    console.print(synth_command(args.num_requests, args.seed))
    for c in commands:
        console.print(c.replace("--attention-dp True", "--attention-dp"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
