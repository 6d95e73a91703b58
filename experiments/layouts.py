"""Which parallel layout drains an offline reasoning batch fastest on 8 H200, according to
the simulator's cost model.

(a) r1-distill-qwen-32b, --num-requests (default 2,000) under DP=8, TP=8, DP=4 x TP=2 and
    DP=2 x TP=4.
(b) llama-3.1-405b (bf16: 811 GB of weights; 8 x H100 = 640 GB cannot hold them, so 8 x H200
    = 1,128 GB) under TP=8 and PP=8, on the first --num-requests-405b requests of the same
    batch (default 200). PP is not fast-forwarded (every step of every stage is an event),
    and under KV pressure PP=8 preempts and recomputes heavily, so its simulation cost grows
    much faster than linearly with the batch: 100 requests take ~12 s, 200 ~60 s, 300 ~80 s
    on 2 cores, 2,000 did not finish in 10 minutes.

Every run uses max-num-seqs --max-num-seqs (default 256) per replica and the default token
budget (8192). Columns: comm share = TP all-reduce time over summed step time (the PP
activation transfer is not in the per-stage rows, so PP shows 0); busy share = busy time of
all (replica, stage) pairs over (replicas x stages x drain): what is left is pipeline bubbles
or replicas that finished early.

Usage: .venv/bin/python experiments/layouts.py [--num-requests 2000] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

from _common import (Row, console, fmt_s, new_table, pct, run, simulate_command, synth_command,
                     write_reasoning_batch)

from emulator.errors import LayoutError
from emulator.specs import ParallelLayout, get_hardware, get_model, plan_memory

QWEN, LLAMA = "r1-distill-qwen-32b", "llama-3.1-405b"
QWEN_LAYOUTS = ((8, 1, 1), (1, 8, 1), (4, 2, 1), (2, 4, 1))  # (dp, tp, pp)
LLAMA_LAYOUTS = ((1, 8, 1), (1, 1, 8))


def settings(model: str, dp: int, tp: int, pp: int, max_num_seqs: int,
             max_requests: int | None = None) -> dict:
    s = {"model": model, "hardware": "h200", "dp": dp, "tp": tp, "pp": pp,
         "max_num_seqs": max_num_seqs}
    if max_requests is not None:
        s["max_requests"] = max_requests
    return s


def name(row: Row) -> str:
    s = row.settings
    parts = [f"{k.upper()}={s[k]}" for k in ("dp", "tp", "pp") if s[k] > 1]
    return " x ".join(parts) or "1 GPU"


def print_rows(rows: list[Row], title: str) -> None:
    t = new_table(title, ["layout", "drain", "tok/s", "TTFT p50", "TTFT p99", "TPOT p50",
                          "TPOT p99", "preempt", "recompute/output", "peak KV", "KV tokens/replica",
                          "weights GB/GPU", "comm share", "busy share", "sim wall s"])
    for row in rows:
        m, mem = row.metrics, row.extra["memory"]
        t.add_row(name(row), fmt_s(m["drain_time_s"]), f"{m['throughput_tokens_per_s']:,.0f}",
                  fmt_s(m["ttft_p50_s"]), fmt_s(m["ttft_p99_s"]), fmt_s(m["tpot_p50_s"]),
                  fmt_s(m["tpot_p99_s"]), f"{m['num_preemptions']:,}", f"{row.recompute_ratio:.2f}",
                  pct(m["kv_peak_usage"]),
                  f"{mem['kv_capacity_tokens_per_replica']:,}",
                  f"{mem['weight_bytes_per_rank'] / 1e9:.1f}", pct(row.comm_share),
                  pct(row.busy_share), f"{row.wall_s:.1f}")
    console.print(t)


def explain_405b_memory() -> None:
    """What the memory plan says about 405B on 8 x H100 and 8 x H200."""
    model = get_model(LLAMA)
    console.print(f"{LLAMA}: {model.weight_bytes / 1e9:,.0f} GB of weights "
                  f"({model.total_params / 1e9:,.1f} B parameters x {model.weight_dtype_bytes} B)")
    for hw in ("h100", "h200"):
        for dp, tp, pp in LLAMA_LAYOUTS:
            layout = ParallelLayout(dp=dp, tp=tp, pp=pp)
            try:
                plan = plan_memory(model, get_hardware(hw), layout)
                console.print(f"  8 x {hw}, tp={tp} pp={pp}: weights {plan.weight_bytes_per_rank / 1e9:.1f} "
                              f"GB per GPU, KV cache {plan.kv_capacity_tokens:,} tokens per replica")
            except LayoutError as exc:
                console.print(f"  8 x {hw}, tp={tp} pp={pp}: does not fit: {exc}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-requests", type=int, default=2000, help="batch size of part (a)")
    ap.add_argument("--num-requests-405b", type=int, default=200,
                    help="first N requests of the batch for part (b) (default 200)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--skip-405b", action="store_true")
    args = ap.parse_args(argv)
    t_all = time.perf_counter()
    n405 = min(args.num_requests_405b, args.num_requests)
    with tempfile.TemporaryDirectory() as tmp:
        trace = write_reasoning_batch(tmp, args.num_requests, args.seed)
        console.print(f"[bold]Layouts on 8 x h200[/]: offline reasoning batch (seed {args.seed})")
        qwen = [run(trace, **settings(QWEN, *lay, args.max_num_seqs)) for lay in QWEN_LAYOUTS]
        print_rows(qwen, f"(a) {QWEN}, {args.num_requests:,} requests, max-num-seqs "
                         f"{args.max_num_seqs} per replica")
        if not args.skip_405b:
            explain_405b_memory()
            llama = [run(trace, **settings(LLAMA, *lay, args.max_num_seqs, n405))
                     for lay in LLAMA_LAYOUTS]
            print_rows(llama, f"(b) {LLAMA}, first {n405:,} requests, max-num-seqs "
                              f"{args.max_num_seqs}")
    console.print("\nReproduce rows (DP=4 x TP=2 of (a); PP=8 of (b)):")
    console.print(f"  {synth_command(args.num_requests, args.seed)}", soft_wrap=True)
    console.print(f"  {simulate_command(settings(QWEN, 4, 2, 1, args.max_num_seqs), 'out/qwen32b-dp4-tp2')}",
                  soft_wrap=True)
    console.print(f"  {simulate_command(settings(LLAMA, 1, 1, 8, args.max_num_seqs, n405), 'out/405b-pp8')}",
                  soft_wrap=True)
    console.print(f"total wall time {time.perf_counter() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
