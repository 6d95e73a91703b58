"""`emulator calibrate`: per-size medians of a benchmark -> fitted profile (+ host probe)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from emulator.calibrate.bench import RAW_SCHEMA, summarize
from emulator.calibrate.fit import FitPoint, fit_profile
from emulator.calibrate.host import HostProbe
from emulator.core.work import StepWork
from emulator.cost.comm import CommProfile
from emulator.cost.profile_io import save_profile
from emulator.errors import ConfigError
from emulator.runtime.awake import HostMode


def probe_host(world: int, profile: CommProfile, *, address: str | None = None,
               timeout_s: float = 60.0, host_mode: HostMode = HostMode(),
               num_bytes: int | None = None, pipeline_template: StepWork | None = None,
               dilation: float = 1.0, gather_bytes: int | None = None,
               gap_model: tuple[str, str] = ("tiny", "h100"),
               pipeline_gap: bool = False, kv_rows: int | None = None,
               kv_row_elems: int | None = None,
               pipeline_warm_bytes: int | None = None,
               pipeline_sizes: tuple[int, ...] = ()) -> HostProbe:
    """Start ``world`` workers (TP over all of them) and measure the host overheads against
    ``profile``'s lines, with the ranks waiting as an emulation in ``host_mode`` waits (the
    overheads differ a lot between modes), with messages of ``num_bytes`` (default
    calibrate.host.PROBE_BYTES; the wake-up after an idle time grows with the message).
    Pipeline transfers are probed with the stages running ``pipeline_template``'s program
    at ``dilation`` (a step of the run to be priced; calibrate.host.pipeline_stages), or a
    single delay each without one. ``gather_bytes`` (a run's logits all-gather per rank):
    the probe steps' all-gather has that size, and its line is re-measured
    (``HostProbe.line_factors``; calibrate.host.measure_host_overhead). ``gap_model``:
    (model, hardware) of the run whose gap between steps is probed. ``pipeline_gap`` (a
    run with PP): the gap is the round trip between a micro-batch's steps in the 2-stage
    group instead (calibrate.host.measure_pipeline_gap), the per-collective slope still
    the TP probe's. ``kv_rows``, ``kv_row_elems``: the KV rows a step of the run writes and
    their size (defaults KV_PROBE_ROWS, KV_PROBE_ROW_ELEMS); the pipeline probe writes its
    template's rows. ``pipeline_warm_bytes``: the run's largest transfer, which the pipeline
    probe's sockets carry first (calibrate.host.measure_pipeline_wake's ``warm_bytes``).
    ``pipeline_sizes``: more transfer sizes the pipeline probe prices (its ``sizes``; 16
    plans per grid point and size then, against 24 for one size)."""
    from emulator.calibrate.host import (KV_PROBE_ROW_ELEMS, KV_PROBE_ROWS, PROBE_BYTES,
                                         measure_host_overhead, measure_pipeline_gap,
                                         measure_pipeline_wake)
    from emulator.runtime.cluster import WorkerGroup
    from emulator.runtime.ray_setup import start_ray
    from emulator.specs import ParallelLayout

    def line_s(op, num_bytes):
        return profile.time_s(op, world if op != "send_recv" else 2, "intra", num_bytes)

    with start_ray(address):
        with WorkerGroup(ParallelLayout(tp=world), backend="gloo", timeout_s=timeout_s) as g:
            g.set_host_mode(host_mode)
            probe = measure_host_overhead(g, line_s, num_bytes=num_bytes or PROBE_BYTES,
                                          gather_bytes=gather_bytes, gap_model=gap_model,
                                          host_mode=host_mode,
                                          kv_rows=kv_rows or KV_PROBE_ROWS,
                                          kv_row_elems=kv_row_elems or KV_PROBE_ROW_ELEMS)
        if not any(e.op == "send_recv" for e in profile.entries):
            return probe
        sizes = tuple(b for b in pipeline_sizes if b != (num_bytes or PROBE_BYTES))
        with WorkerGroup(ParallelLayout(pp=2), backend="gloo", timeout_s=timeout_s) as g:
            g.set_host_mode(host_mode)
            pipeline = measure_pipeline_wake(g, line_s, num_bytes=num_bytes or PROBE_BYTES,
                                             template=pipeline_template, dilation=dilation,
                                             kv_row_elems=kv_row_elems or KV_PROBE_ROW_ELEMS,
                                             warm_bytes=pipeline_warm_bytes,
                                             sizes=sizes, num_steps=16 if sizes else 24)
            if pipeline_gap:
                pipeline["step_gap_s"], pipeline["step_gap_driver_s"] = \
                    measure_pipeline_gap(g, *gap_model, host_mode=host_mode)
        return probe._replace(host=probe.host.model_copy(update=pipeline))


def calibrate(raw: pa.Table, *, name: str, host_probe: bool = True,
              address: str | None = None, output: Path | None = None,
              host_mode: HostMode = HostMode(), measured_curve: bool = True
              ) -> tuple[CommProfile, list[FitPoint]]:
    """Fit ``raw`` (RAW_SCHEMA rows of `bench collectives`) and, with ``host_probe``, measure
    the host overheads on the smallest benchmarked world (ranks in ``host_mode``); save to
    ``output`` if given."""
    missing = [c for c in RAW_SCHEMA.names if c not in raw.column_names]
    if missing:
        raise ConfigError(f"benchmark table lacks columns {missing}; pass the Parquet "
                          "written by `emulator bench collectives`")
    med = summarize(raw)
    profile, points = fit_profile(name, med["op"].to_numpy(zero_copy_only=False),
                                  med["group_size"].to_numpy(),
                                  med["placement"].to_numpy(zero_copy_only=False),
                                  med["bytes"].to_numpy(), med["time_s"].to_numpy(),
                                  measured_curve=measured_curve)
    if host_probe:
        have = {e.op for e in profile.entries}
        if not {"all_reduce", "all_gather"} <= have:
            raise ConfigError("the host probe prices its steps with the all_reduce and "
                              "all_gather lines: include both in --ops, or pass "
                              "--no-host-probe")
        worlds = [n for n, o in zip(med["group_size"].to_pylist(), med["op"].to_pylist())
                  if o != "send_recv"] or [2]
        host = probe_host(int(np.min(worlds)), profile, address=address,
                          host_mode=host_mode).host
        profile = profile.model_copy(update={"host": host})
    if output is not None:
        save_profile(profile, output)
    return profile, points
