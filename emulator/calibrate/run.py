"""`emulator calibrate`: per-size medians of a benchmark -> fitted profile (+ host probe)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from emulator.calibrate.bench import RAW_SCHEMA, summarize
from emulator.calibrate.fit import FitPoint, fit_profile
from emulator.cost.comm import CommProfile, HostOverhead
from emulator.cost.profile_io import save_profile
from emulator.errors import ConfigError


def probe_host(world: int, profile: CommProfile, *, address: str | None = None,
               timeout_s: float = 60.0, delay_mode: str = "auto") -> HostOverhead:
    """Start ``world`` workers (TP over all of them) and measure the host overheads against
    ``profile``'s lines, with compute delays waited as an emulation with ``delay_mode``
    waits them (the overheads differ a lot between spinning and sleeping ranks)."""
    from emulator.calibrate.host import measure_host_overhead
    from emulator.runtime.cluster import WorkerGroup
    from emulator.runtime.ray_setup import start_ray
    from emulator.specs import ParallelLayout

    with start_ray(address):
        with WorkerGroup(ParallelLayout(tp=world), backend="gloo", timeout_s=timeout_s) as g:
            g.get([actor.set_delay_mode.remote(delay_mode, world) for actor in g.actors],
                  timeout_s, "set the delay mode")
            return measure_host_overhead(
                g, lambda op, b: profile.time_s(op, world, "intra", b))


def calibrate(raw: pa.Table, *, name: str, host_probe: bool = True,
              address: str | None = None, output: Path | None = None
              ) -> tuple[CommProfile, list[FitPoint]]:
    """Fit ``raw`` (RAW_SCHEMA rows of `bench collectives`) and, with ``host_probe``, measure
    the host overheads on the smallest benchmarked world; save to ``output`` if given."""
    missing = [c for c in RAW_SCHEMA.names if c not in raw.column_names]
    if missing:
        raise ConfigError(f"benchmark table lacks columns {missing}; pass the Parquet "
                          "written by `emulator bench collectives`")
    med = summarize(raw)
    profile, points = fit_profile(name, med["op"].to_numpy(zero_copy_only=False),
                                  med["group_size"].to_numpy(),
                                  med["placement"].to_numpy(zero_copy_only=False),
                                  med["bytes"].to_numpy(), med["time_s"].to_numpy())
    if host_probe:
        have = {e.op for e in profile.entries}
        if not {"all_reduce", "all_gather"} <= have:
            raise ConfigError("the host probe prices its steps with the all_reduce and "
                              "all_gather lines: include both in --ops, or pass "
                              "--no-host-probe")
        worlds = [n for n, o in zip(med["group_size"].to_pylist(), med["op"].to_pylist())
                  if o != "send_recv"] or [2]
        host = probe_host(int(np.min(worlds)), profile, address=address)
        profile = profile.model_copy(update={"host": host})
    if output is not None:
        save_profile(profile, output)
    return profile, points
