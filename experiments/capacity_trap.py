"""The capacity trap: an offline reasoning batch on llama-3.1-8b, one H200, sweeping
max-num-seqs; then the same batch on 8 H200 as DP=8 to show that the slowest replica sets
the drain time.

Part 1 sweeps --max-num-seqs 256 ... 8192. The scheduler requires max-num-batched-tokens >=
max-num-seqs (one decode token per seat), so the token budget is max(8192, max-num-seqs):
8192 up to max-num-seqs 8192. Part 2 runs DP=8 (8 replicas, independent KV pools) with the
routers least_outstanding and round_robin at --dp-max-num-seqs per replica, and prints each
replica's drain time (its last finish, from requests.parquet's replica column).

The default batch (3,000 requests) keeps the whole script at a few minutes on 2 cores;
the simulated drain times are hours.

Usage: .venv/bin/python experiments/capacity_trap.py [--num-requests 3000] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import numpy as np

from _common import (Row, console, fmt_s, new_table, pct, run, simulate_command,
                                 synth_command, write_reasoning_batch)

MODEL, HARDWARE = "llama-3.1-8b", "h200"
SEATS = (256, 512, 1024, 2048, 4096, 8192)
ROUTERS = ("least_outstanding", "round_robin")


def sweep_settings(max_num_seqs: int) -> dict:
    return {"model": MODEL, "hardware": HARDWARE, "max_num_seqs": max_num_seqs,
            "max_num_batched_tokens": max(8192, max_num_seqs)}


def dp_settings(router: str, max_num_seqs: int) -> dict:
    return {"model": MODEL, "hardware": HARDWARE, "dp": 8, "router": router,
            "max_num_seqs": max_num_seqs, "max_num_batched_tokens": max(8192, max_num_seqs)}


def print_sweep(rows: list[Row], title: str) -> None:
    t = new_table(title, ["max-num-seqs", "drain", "throughput tok/s", "preemptions",
                          "recompute/output", "peak KV", "mean batch", "TTFT p99", "TPOT p99",
                          "sim wall s"])
    for row in rows:
        m = row.metrics
        t.add_row(str(row.settings["max_num_seqs"]), fmt_s(m["drain_time_s"]),
                  f"{m['throughput_tokens_per_s']:,.0f}", f"{m['num_preemptions']:,}",
                  f"{row.recompute_ratio:.2f}", pct(m["kv_peak_usage"]), f"{row.mean_batch:,.0f}", fmt_s(m["ttft_p99_s"]),
                  fmt_s(m["tpot_p99_s"]), f"{row.wall_s:.1f}")
    console.print(t)


def print_dp(rows: list[Row], single: Row) -> None:
    t = new_table("DP=8 (8 x h200, one replica per GPU): summary",
                  ["router", "drain", "throughput tok/s", "preemptions", "recompute/output", "peak KV",
                   "TTFT p99", "TPOT p99", "replica busy share", "sim wall s"])
    for row in rows:
        m = row.metrics
        t.add_row(row.settings["router"], fmt_s(m["drain_time_s"]),
                  f"{m['throughput_tokens_per_s']:,.0f}", f"{m['num_preemptions']:,}",
                  f"{row.recompute_ratio:.2f}", pct(m["kv_peak_usage"]), fmt_s(m["ttft_p99_s"]),
                  fmt_s(m["tpot_p99_s"]), pct(row.busy_share), f"{row.wall_s:.1f}")
    console.print(t)
    for row in rows:
        reps = row.per_replica()
        t = new_table(f"DP=8, router {row.settings['router']}: per replica",
                      ["replica", "requests", "output tokens", "longest output", "drain",
                       "preemptions"])
        for rep in reps:
            t.add_row(str(rep["replica"]), str(rep["num_requests"]), f"{rep['output_tokens']:,}",
                      f"{rep['longest_output_tokens']:,}", fmt_s(rep["drain_time_s"]), f"{rep['num_preemptions']:,}")
        console.print(t)
        drains = np.array([rep["drain_time_s"] for rep in reps])
        tokens = np.array([rep["output_tokens"] for rep in reps])
        slowest = int(drains.argmax())
        console.print(
            f"  slowest replica {slowest}: {drains.max():,.0f} s = run drain "
            f"{row.metrics['drain_time_s']:,.0f} s; fastest {drains.min():,.0f} s; "
            f"slowest / mean = {drains.max() / drains.mean():.3f}; replica with most output "
            f"tokens: {int(tokens.argmax())} ({tokens.max() / tokens.mean():.3f}x the mean). "
            f"Speed-up over one GPU: {single.metrics['drain_time_s'] / drains.max():.2f}x on 8 GPUs.")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-requests", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dp-max-num-seqs", type=int, default=256,
                    help="max-num-seqs of each DP replica in part 2 (default 256)")
    args = ap.parse_args(argv)
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        trace = write_reasoning_batch(tmp, args.num_requests, args.seed)
        console.print(f"[bold]Capacity trap[/]: {args.num_requests:,}-request offline reasoning "
                      f"batch (seed {args.seed}), {MODEL} on {HARDWARE}")
        sweep = [run(trace, **sweep_settings(s)) for s in SEATS]
        mem = sweep[0].extra["memory"]
        console.print(f"KV cache per replica: {mem['kv_capacity_tokens_per_replica']:,} tokens "
                      f"({mem['num_kv_blocks_per_replica']:,} blocks of {mem['block_size']}); "
                      f"weights {mem['weight_bytes_per_rank'] / 1e9:.1f} GB per GPU")
        print_sweep(sweep, "One h200, sweeping max-num-seqs "
                           "(max-num-batched-tokens = max(8192, max-num-seqs))")
        dp = [run(trace, **dp_settings(r, args.dp_max_num_seqs)) for r in ROUTERS]
        single = next((r for r in sweep if r.settings["max_num_seqs"] == args.dp_max_num_seqs),
                      sweep[0])
        print_dp(dp, single)
        same = all(np.array_equal(dp[0].requests.column("replica").to_numpy(),
                                  d.requests.column("replica").to_numpy()) for d in dp[1:])
        if same:
            console.print("  The routers assigned every request to the same replica: with all "
                          "arrivals at t = 0 and nothing finished yet, least_outstanding sees "
                          "tied counts in turn and picks replicas in round-robin order.")
    console.print("\nReproduce a row (one h200, max-num-seqs 1024; DP=8 round_robin):")
    console.print(f"  {synth_command(args.num_requests, args.seed)}", soft_wrap=True)
    console.print(f"  {simulate_command(sweep_settings(1024), 'out/seqs-1024')}", soft_wrap=True)
    console.print(f"  {simulate_command(dp_settings('round_robin', args.dp_max_num_seqs), 'out/dp8-rr')}",
                  soft_wrap=True)
    console.print(f"total wall time {time.perf_counter() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
