"""`emulator bench collectives`: a collective microbenchmark on Ray workers, nccl-tests
style (https://github.com/NVIDIA/nccl-tests/blob/master/doc/PERFORMANCE.md).

For every world size, one WorkerGroup is started (layout ``tp = world``: one process group,
ranks packed on one node by the TP placement group; ``spread=True`` uses ``dp = world`` so
Ray may place the ranks on several nodes) and every (op, size) is timed with
``Worker.bench_sizes``: a barrier, then the op, per iteration, on all ranks at once, round
robin over the sizes (a burst of load elsewhere spreads over all sizes).
An iteration's time is ``max(exit) - max(entry)`` over the ranks (the transfer time of the
emulator's collective records: the op's time once the last rank has entered it).

Sizes are nccl-tests' "size": all_reduce the buffer, all_gather the gathered output,
all_to_all each rank's send buffer, send_recv the message (ranks 0 -> 1; measured once,
with the smallest world, group size 2). ``algbw = size / time``, ``busbw = algbw x`` the
bus factor (fit.BUS_FACTOR). On a host with fewer cores than ranks the ranks share cores and
the times are noisy: time with ranks <= cores.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from emulator.calibrate.fit import BUS_FACTOR
from emulator.cost.comm import COMM_OPS
from emulator.errors import ConfigError
from emulator.runtime.awake import HostMode

RAW_SCHEMA = pa.schema([("op", pa.string()), ("group_size", pa.int32()),
                        ("placement", pa.string()), ("bytes", pa.int64()),
                        ("iteration", pa.int32()), ("time_s", pa.float64())])
"""One row per timed iteration (what `bench` saves as Parquet)."""

MIB = 1 << 20


def parse_size(text: str) -> int:
    """'8', '64K', '64M', '1G' -> bytes (powers of 1024, as nccl-tests)."""
    t = text.strip().upper().removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    try:
        value = int(t[:-1] if mult > 1 else t) * mult
    except ValueError:
        raise ConfigError(f"size {text!r}: expected an integer with an optional K, M or G "
                          "suffix (e.g. 64K)") from None
    if value < 1:
        raise ConfigError(f"size {text!r} must be >= 1 byte")
    return value


def sizes_between(min_bytes: int, max_bytes: int, factor: int = 2) -> list[int]:
    """min, min*factor, ... up to max (nccl-tests -b/-e/-f)."""
    if max_bytes < min_bytes:
        raise ConfigError(f"--max-bytes {max_bytes} is below --min-bytes {min_bytes}")
    out, size = [], min_bytes
    while size <= max_bytes:
        out.append(size)
        size *= factor
    return out


def check_ops(ops: Sequence[str]) -> list[str]:
    bad = [o for o in ops if o not in COMM_OPS]
    if bad or not ops:
        raise ConfigError(f"--ops {','.join(ops)}: choose from {','.join(COMM_OPS)}")
    return list(ops)


def iterations_for(num_bytes: int, num_iters: int) -> int:
    """Fewer iterations for the largest messages (about num_iters x 8 MiB moved at most,
    >= 3): all of them up to 8 MiB, where runs send logits and prefill activations and a
    median of 3 heavy-tailed times would be noise."""
    return max(3, min(num_iters, int(num_iters * 8 * MIB / max(num_bytes, 1))))


def run_bench(ops: Sequence[str], sizes: Sequence[int], worlds: Sequence[int], *,
              num_iters: int = 40, num_warmup: int = 2, spread: bool = False,
              address: str | None = None, timeout_s: float = 60.0,
              host_mode: HostMode = HostMode(), on_row=None) -> pa.Table:
    """Time every (world, op, size); one row per iteration (RAW_SCHEMA). ``host_mode``:
    the ranks' spinners and priority (runtime.awake), as in the emulation to be priced."""
    from emulator.runtime.cluster import WorkerGroup
    from emulator.runtime.ray_setup import start_ray
    from emulator.specs import ParallelLayout

    ops = check_ops(ops)
    cols: dict[str, list] = {name: [] for name in RAW_SCHEMA.names}
    with start_ray(address):
        for w, world in enumerate(sorted(set(worlds))):
            if world < 2:
                raise ConfigError(f"--world {world}: a collective needs at least 2 ranks")
            layout = ParallelLayout(dp=world) if spread else ParallelLayout(tp=world)
            with WorkerGroup(layout, backend="gloo", timeout_s=timeout_s) as group:
                group.set_host_mode(host_mode)
                nodes = group.node_of_rank()
                for op in ops:
                    if op == "send_recv" and w > 0:
                        continue  # group size 2 whatever the world: measured once
                    n = 2 if op == "send_recv" else world
                    ranks = [0, 1] if op == "send_recv" else list(range(world))
                    placement = "inter" if len({nodes[r] for r in ranks}) > 1 else "intra"
                    iters = [iterations_for(size, num_iters) for size in sizes]
                    per_rank = group.get(
                        [a.bench_sizes.remote(op, list(sizes), iters, num_warmup)
                         for a in group.actors], timeout_s * (sum(iters) + num_warmup),
                        f"benchmark {op} over {len(sizes)} sizes")
                    for j, size in enumerate(sizes):
                        times = np.stack([r[j] for r in per_rank])[ranks]  # [ranks, iters, 2]
                        per_iter = times[:, :, 1].max(axis=0) - times[:, :, 0].max(axis=0)
                        cols["op"] += [op] * iters[j]
                        cols["group_size"] += [n] * iters[j]
                        cols["placement"] += [placement] * iters[j]
                        cols["bytes"] += [size] * iters[j]
                        cols["iteration"] += list(range(iters[j]))
                        cols["time_s"] += per_iter.tolist()
                        if on_row is not None:
                            on_row(op, n, size, float(np.median(per_iter)))
    return pa.Table.from_pydict(cols, schema=RAW_SCHEMA)


def summarize(raw: pa.Table) -> pa.Table:
    """Per (op, group size, placement, bytes): iterations, median / min time, algbw and
    busbw (bytes/s, from the median time), in nccl-tests' order."""
    op = raw["op"].to_numpy(zero_copy_only=False).astype(str)
    n = raw["group_size"].to_numpy()
    pl = raw["placement"].to_numpy(zero_copy_only=False).astype(str)
    size = raw["bytes"].to_numpy()
    t = raw["time_s"].to_numpy()
    keys = sorted(set(zip(op.tolist(), n.tolist(), pl.tolist(), size.tolist())),
                  key=lambda k: (COMM_OPS.index(k[0]), k[1], k[2], k[3]))
    out: dict[str, list] = {k: [] for k in ("op", "group_size", "placement", "bytes",
                                            "num_iters", "time_s", "min_time_s",
                                            "algbw_bytes_per_s", "busbw_bytes_per_s")}
    for o, g, p, b in keys:
        sel = (op == o) & (n == g) & (pl == p) & (size == b)
        med = float(np.median(t[sel]))
        algbw = b / med if med > 0 else float("nan")
        for k, v in zip(out, (o, g, p, b, int(sel.sum()), med, float(t[sel].min()), algbw,
                              algbw * BUS_FACTOR[o](g))):
            out[k].append(v)
    return pa.table(out)
