"""How steady is this host's communication? The floor under any per-collective validation.

Two bare ``torch.distributed`` processes (gloo over loopback, no Ray) run the pattern an
emulation step runs: a compute delay, then an all-reduce, over and over, for a while. The
time is cut into consecutive windows; each window's median all-reduce time is printed, and
the figure is the spread of the window medians as a ratio against their own median (the
reference, measured in the same run): how far the host's own collective median moves from
one window to the next. A simulator's prediction of a collective median from a profile
measured at another time cannot be expected to do better than this spread.

The ranks wait as the emulator's ranks do (runtime.awake, delay): idle-priority spinners,
real-time priority where permitted, slept delays with the same spun tail, pinned to CPUs
where the emulator would pin them (``--pin-ranks on|off`` to compare).

    .venv/bin/python benchmarks/bench_host_drift.py [--bytes 262144] [--delay-ms 1.6]
        [--windows 40] [--per-window 400] [--rank-priority auto|realtime|normal]
        [--keep-awake auto|on|off] [--pin-ranks auto|on|off]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np


def _rank(rank: int, port: int, args: argparse.Namespace, realtime: bool, spin_s: float,
          cpu_slot, queue) -> None:
    import torch
    import torch.distributed as dist

    from emulator.runtime.awake import pin_threads, set_realtime
    from emulator.runtime.delay import precise_sleep

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    set_realtime(realtime)
    pin_threads(cpu_slot)  # after the init: gloo's threads too
    buf = torch.zeros(args.bytes // 2, dtype=torch.bfloat16)
    for _ in range(20):
        dist.all_reduce(buf)
    windows = []
    for _ in range(args.windows):  # a fixed count per window: both ranks stay in step
        times = []
        for _ in range(args.per_window):
            precise_sleep(args.delay_ms * 1e-3, spin_s)
            t0 = time.perf_counter()
            dist.all_reduce(buf)
            times.append(time.perf_counter() - t0)
        windows.append((time.monotonic(), statistics.median(times)))
    dist.destroy_process_group()
    if rank == 0:
        queue.put(windows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bytes", type=int, default=256 * 1024)
    ap.add_argument("--delay-ms", type=float, default=1.6)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--per-window", type=int, default=400)
    ap.add_argument("--rank-priority", default="auto", choices=["auto", "realtime", "normal"])
    ap.add_argument("--keep-awake", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--pin-ranks", default="auto", choices=["auto", "on", "off"])
    args = ap.parse_args()

    import torch.multiprocessing as mp

    from emulator.runtime.awake import HostMode, IdleSpinners, cpus_available, decide

    mode = HostMode(keep_awake=args.keep_awake, rank_priority=args.rank_priority,
                    pin_ranks=args.pin_ranks)
    waits = [decide(mode, "gloo", 2, cpus_available(), r) for r in range(2)]
    awake, spin_s, realtime = waits[0].keep_awake, waits[0].spin_s, waits[0].realtime
    spinners = IdleSpinners()
    spinners.start(cpus_available() if awake else 0)
    try:
        ctx = mp.get_context("spawn")
        queue = ctx.SimpleQueue()
        port = 29000 + os.getpid() % 1000
        procs = [ctx.Process(target=_rank, args=(r, port, args, realtime, spin_s,
                                                 waits[r].cpu_slot, queue))
                 for r in range(2)]
        for p in procs:
            p.start()
        windows = queue.get()
        for p in procs:
            p.join(timeout=60)
    finally:
        spinners.stop()
    t0 = windows[0][0]
    med = np.array([m for _, m in windows])
    ref = float(np.median(med))
    print(f"all-reduce {args.bytes:,} B after a {args.delay_ms:g} ms delay, 2 ranks, "
          f"{args.per_window} per window; spinners {'on' if awake else 'off'}, "
          f"{'realtime' if realtime else 'normal'} priority, "
          f"{'not pinned' if waits[0].cpu_slot is None else 'pinned'}; "
          f"load {os.getloadavg()}")
    print("window medians (us), each at seconds since the first window ended:")
    print("  " + ", ".join(f"{(t - t0):.0f}s {m * 1e6:.0f}" for t, m in windows))
    print(f"median of window medians {ref * 1e6:.1f} us (reference)")
    print(f"spread: min / reference {med.min() / ref:.3f}, max / reference "
          f"{med.max() / ref:.3f}, mean |window - reference| / reference "
          f"{float(np.mean(np.abs(med - ref))) / ref:.3f}")


if __name__ == "__main__":
    main()
