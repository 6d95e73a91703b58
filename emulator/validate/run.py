"""`emulator validate`: emulate, simulate with the host profile, join, report.

Units (DESIGN section 3): the emulator's tables are host seconds / ``dilation``; its compute
delays are the cost model's times x ``dilation``, its collectives run undilated. So the
simulator predicts the emulation in the same units with compute x1 and everything measured
on the host — the calibrated collective lines and the host overheads — x 1/dilation:
``profile.scaled(1 / dilation)``. The simulation steps every plan (no fast-forward) through
a :class:`CostModelExecutor` that is given the scaled :class:`HostOverhead` and the event
loop's clock, so per-step overheads, straggler waits and PP bubbles are priced per plan.

Comparable runs need the same plans: use an offline batch trace (see join.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from emulator.atomic import write_json_atomic
from emulator.build import build_run
from emulator.calibrate.host import PROBE_BYTES, HostProbe
from emulator.config import RunConfig
from emulator.core.plan import BatchPlan
from emulator.core.work import StepWork
from emulator.cost.comm import CommProfile, HostOverhead
from emulator.cost.profile_io import load_profile, save_profile
from emulator.errors import ConfigError
from emulator.metrics.io import RunWriter
from emulator.runtime.awake import HostMode
from emulator.simulator.engine import CostModelExecutor, Simulation
from emulator.simulator.run import RunTables, request_table, run_extra, simulate
from emulator.validate.join import join_steps
from emulator.validate.report import (collective_errors, collective_instances, drain_error,
                                      driver_thermometer, noise_floor, read_thermometer,
                                      request_errors, step_errors, thermometer_shifts)

TARGETS = {"step_time_median_error": 0.10, "drain_time_error": 0.10,
           "collective_median_error_large": 0.15}
"""The acceptance bounds of the verdict (magnitudes)."""


def host_profile(config: RunConfig) -> CommProfile:
    if config.comm_profile is None:
        raise ConfigError("validate needs --comm-profile: the host profile written by "
                          "`emulator calibrate -o host.json` on this host")
    return load_profile(config.comm_profile)


def simulate_host(config: RunConfig, profile: CommProfile) -> RunTables:
    """The simulator's prediction of an emulation of ``config`` on the calibrated host."""
    setup = build_run(config)
    scaled = profile.scaled(1.0 / config.dilation)
    setup.cost = setup.cost.with_profile(scaled)
    requests = setup.new_requests()
    sim = Simulation(requests, setup.new_schedulers(requests), setup.new_router(), setup.cost,
                     fast_forward=False)
    sim.executor = CostModelExecutor(setup.cost, requests, host=scaled.host,
                                     clock=lambda: sim.now_s)
    sim.run()
    return RunTables(requests=request_table(requests).to_table(), steps=sim.steps.to_table(),
                     extra=run_extra(setup, requests))


def probe_bytes(config: RunConfig) -> int:
    """The message size to probe the host with for ``config``: the activations of the run's
    median step (lower median by tokens; what its TP all-reduces and pipeline transfers
    carry), from a simulation
    without host overheads (an offline batch's plans do not depend on timing)."""
    return probe_plan(config)[0]


class ProbePlan(NamedTuple):
    """What the host probes of a run are shaped by (:func:`probe_plan`)."""

    num_bytes: int
    """:func:`probe_bytes`."""
    template: StepWork | None
    """The cost model's work of a step shaped like the run's median one; None for an empty
    run. The pipeline probe runs its stages' program (calibrate.host.pipeline_stages)."""
    largest_bytes: int
    """The activations of the run's largest step (its prefill's, usually): what the
    pipeline probe's sockets carry first (calibrate.host.measure_pipeline_wake's
    ``warm_bytes``)."""
    quartile_bytes: tuple[int, ...]
    """The activations of the run's steps at the lower quartile, median and upper quartile
    by tokens (distinct, ascending): the sizes the pipeline probe prices its transfers at
    (calibrate.host.measure_pipeline_wake's ``sizes``)."""


def probe_plan(config: RunConfig) -> ProbePlan:
    """The median step by tokens of a simulation without host overheads, rebuilt as a plan
    of its decodes (each with an equal share of the KV cache it held) and one prefill of its
    prompt tokens, with its activations' size and the largest step's (:class:`ProbePlan`)."""
    setup = build_run(config)
    steps = simulate(setup).steps
    if not steps.num_rows:
        return ProbePlan(PROBE_BYTES, None, PROBE_BYTES, (PROBE_BYTES,))
    prefill = steps["num_prefill_tokens"].to_numpy()
    decode = steps["num_decode_tokens"].to_numpy()
    tokens = prefill + decode
    order = np.argsort(tokens, kind="stable")
    row = int(order[(tokens.size - 1) // 2])  # (lower) median
    token_bytes = setup.model.hidden_size * setup.model.dtype_bytes
    quartiles = tuple(sorted({max(1, int(tokens[order[(tokens.size - 1) * q // 4]]))
                              * token_bytes for q in (1, 2, 3)}))
    num_bytes = max(1, int(tokens[row])) * token_bytes
    p, d = int(prefill[row]), int(decode[row])
    held = int(steps["kv_blocks_used"].to_numpy()[row]) * config.block_size
    ctx = max(0, held - p) // max(d, 1)
    new = np.array([1] * d + ([p] if p else []), dtype=np.int64)
    plan = BatchPlan(replica=0, step=0, micro_batch=0,
                     request_ids=[str(i) for i in range(new.size)],
                     request_index=np.arange(new.size, dtype=np.int64), num_new_tokens=new,
                     num_context_tokens=np.array([ctx] * d + ([0] if p else []), dtype=np.int64),
                     is_prefill=np.array([False] * d + ([True] if p else []), dtype=bool))
    return ProbePlan(num_bytes, setup.cost.step_work(plan), max(1, int(tokens.max())) * token_bytes,
                     quartiles)


def gather_bytes(config: RunConfig, template: StepWork | None) -> int | None:
    """The logits all-gather (bytes per rank) of ``template`` (probe_plan's step) in a TP
    run, which the host probe re-measures (calibrate.host.measure_host_overhead), else None:
    the probe's other messages have the activations' size (probe_bytes), so the
    all-reduces and pipeline transfers are priced against overheads measured at their size,
    but the logits are several MB."""
    if template is None or config.tp < 2:
        return None
    return int(template.stages[-1].logits_gather_bytes) or None


def probe_drift(before: HostOverhead, after: HostOverhead, line_s: float) -> float:
    """Relative change of a probed collective after 1 ms idle (line + wake-up) from the
    probe before the emulation to the one after: how much the host moved meanwhile."""
    b, a = line_s + float(before.wake(1e-3)), line_s + float(after.wake(1e-3))
    return (a - b) / b


def build_report(config: RunConfig, profile: CommProfile, emu: RunTables, sim: RunTables,
                 node_of_rank: list | None = None) -> tuple[dict[str, Any], dict]:
    """validation.json's document and the joined steps (raises ValidationJoinError)."""
    joined = join_steps(emu.steps, sim.steps)
    report: dict[str, Any] = {}
    steps = step_errors(joined)
    report.update({k: v for k, v in steps.items() if k != "by_kind"})
    report.update(noise_floor(joined))
    report.update(drain_error(emu.requests, emu.steps, sim.requests, sim.steps))
    report.update(request_errors(emu.requests, sim.requests))
    scaled = profile.scaled(1.0 / config.dilation)
    probes: dict[str, Any] = {}
    if emu.collectives is not None and emu.collectives.num_rows:
        inst = collective_instances(emu.collectives, node_of_rank)
        coll = collective_errors(inst, scaled)
        probes = read_thermometer(inst, scaled)
    else:
        coll = {"collective_median_error_small": None, "collective_median_error_large": None,
                "by_op": []}
    report["collective_median_error_small"] = coll["collective_median_error_small"]
    report["collective_median_error_large"] = coll["collective_median_error_large"]
    report["steps_by_kind"] = steps["by_kind"]
    report["collectives"] = coll
    report["thermometer"] = probes
    report["host_overheads"] = profile.host.model_dump() if profile.host is not None else None
    report["dilation"] = config.dilation
    report["profile"] = profile.name
    report["verdict"] = verdict(report)
    return report, joined


AS_CALIBRATED_KEYS = ("step_time_median_error", "step_time_mape", "drain_time_error",
                      "collective_median_error_small", "collective_median_error_large",
                      "steps_by_kind", "collectives", "verdict", "profile")
"""What a thermometer-priced report keeps of the as-calibrated one (``as_calibrated``)."""


def verdict(report: dict[str, Any]) -> str:
    """One line: PASS/FAIL against TARGETS, with the noise floor beside them."""
    parts, failed = [], []
    for key, bound in TARGETS.items():
        value = report.get(key)
        label = key.replace("_error", "").replace("_", " ")
        if value is None:
            parts.append(f"{label} n/a")
            continue
        parts.append(f"{label} {value * 100:+.1f}%")
        if abs(value) > bound:
            failed.append(f"{label} |{value * 100:.1f}%| > {bound * 100:.0f}%")
    nf = report.get("noise_floor_mape")
    noise = "n/a" if nf is None else f"{nf * 100:.1f}%"
    head = "PASS" if not failed else "FAIL (" + "; ".join(failed) + ")"
    return (f"{head}: " + ", ".join(parts) + f"; per-step MAPE "
            f"{report['step_time_mape'] * 100:.1f}% vs noise floor {noise}")


def revalidate(outdir: Path, comm_profile: Path | None = None, *,
               thermometer: bool = True) -> dict[str, Any]:
    """Redo the simulation and the report of an existing validation directory (its
    emulate/ run is read back, not re-run) with ``comm_profile``, else the profile the
    validation used (``host-profile.json`` when the host was re-probed). Without
    ``thermometer`` the report is priced as calibrated even where the run has probes; the
    host probes of the earlier report are kept (with another profile they are reported,
    not priced: ``line_factors_applied`` is false)."""
    from emulator.metrics.io import read_run

    outdir = Path(outdir)
    previous = outdir / "validation.json"
    probes = (json.loads(previous.read_text()).get("host_probes")
              if previous.exists() else None)
    run = read_run(outdir / "emulate")
    config = RunConfig.model_validate(run.summary["config"])
    own = outdir / "host-profile.json"  # the validation's own: the probes priced in it
    if comm_profile is None and own.exists():
        comm_profile = own
    elif (comm_profile is not None and probes is not None
          and Path(comm_profile).resolve() != own.resolve()):
        probes = {**probes, "line_factors_applied": False}
    if comm_profile is not None:
        config = config.model_copy(update={"comm_profile": Path(comm_profile)})
    saved = run.summary.get("extra") or {}
    emu = RunTables(requests=run.requests, steps=run.steps, collectives=run.collectives,
                    extra={"control": saved.get("control"),
                           "host_mode": saved.get("host_mode")})
    return report_runs(config, host_profile(config), outdir, emu, run.summary.get("nodes"),
                       probes, thermometer=thermometer)


def _simulate_and_report(config: RunConfig, profile: CommProfile, simdir: Path,
                         emu: RunTables, nodes: list | None) -> tuple[dict[str, Any], dict]:
    sim = simulate_host(config, profile)
    RunWriter(simdir).finish(
        requests=sim.requests, steps=sim.steps, mode="simulate", config=config,
        extra={**sim.extra, "comm_profile_scale": 1.0 / config.dilation,
               "comm_profile": profile.name})
    return build_report(config, profile, emu, sim, nodes)


def validate(config: RunConfig, outdir: Path, *, host_probe: bool = True,
             thermometer: bool = True, on_progress=None) -> dict[str, Any]:
    """Emulate and simulate ``config``, write both runs under ``outdir`` (emulate/,
    simulate/, and simulate-thermometer/ when re-priced), ``validation.json`` and
    ``validation.png``; return the report.

    ``host_probe``: re-measure the host overheads (calibrate/host.py; ~15 s each at TP=2,
    ~75 s at PP=2 dilation 50, whose pipeline probe runs the run's stages at three
    transfer sizes) right before and right after the emulation, with messages of the run's
    size (probe_bytes; the pipeline's at its quartile sizes too, ProbePlan.quartile_bytes),
    and price with their mean instead of the profile's: on a shared host they follow the
    machine's load, which drifts between `calibrate` and `validate` and during the run (on
    the development VM a collective's median moved 2x over tens of seconds, in raw
    torch.distributed too). The report gives both probes and their drift. The collective
    lines come from the profile (the file is not modified), except the logits all-gather's
    (:func:`gather_bytes`): each probe re-measures it at the run's size in its steps, and
    the report prices with the mean factor of the two (``host_probes.line_factors``): the
    speed of MB-sized messages drifts apart from that of the run's activations.

    ``thermometer`` (with tp > 1): every stage of every step of the emulation also repeats
    its middle layer's first all-reduce over TP, back to back (RunConfig.thermometer: the
    same size and buffer, as in the host probes' steps), which the simulator prices too,
    with what the host probes measured for a call in that position
    (HostOverhead.thermometer_wake_s). The host's collective speed switches between levels
    for tens of seconds at a time on a shared VM (benchmarks/bench_host_drift.py), so a
    profile measured at another time is off by as much; the probes measure it during the
    run, apart from the collectives validated. The report is then
    priced with the group collectives' lines shifted by what the probes measured
    (``thermometer``, ``thermometer_shift_s``), and keeps the errors as calibrated
    (``as_calibrated``). Pipeline transfers get no probe: a back-to-back transfer did not
    track transfers after a stage's idle wait (docs/results-validation.md, repeat 7).

    The emulation runs without ``run_ahead`` (each plan submitted when the step before it
    has reported), the loop whose gap between steps the host probes measure and the
    simulator prices (HostOverhead.step_gap_s); running ahead, that gap is the ranks' own
    turnaround while the driver keeps ahead, and the driver's round trip where it cannot,
    which no probe measures yet.

    With pp > 1 the host probes measure the round trip between a micro-batch's steps in a
    2-stage pipeline (calibrate.host.measure_pipeline_gap), and ``thermometer`` scales it
    by the run's driver busy time per step over the probe's (report.driver_thermometer,
    ``driver_thermometer``), keeping the errors as calibrated beside it too."""
    from emulator.calibrate.run import probe_host
    from emulator.runtime.executor import emulate
    from emulator.runtime.shards import ELEMENT_BYTES, kv_row_elems

    # The emulation waits for each step before submitting the next (RunConfig.run_ahead
    # off): the host probes price that loop's gap between steps.
    config = config.model_copy(update={"run_ahead": False})
    profile = host_profile(config)
    outdir = Path(outdir)
    probes: list[HostProbe] = []
    num_bytes, template, largest, quartiles = (probe_plan(config) if host_probe or thermometer
                                               else (0, None, None, ()))
    if thermometer and config.tp > 1:
        config = config.model_copy(update={"thermometer": True})
    gather = gather_bytes(config, template)
    setup = build_run(config, record_slots=True)
    # The probes write KV rows of the size the run's ranks hold (as Worker.allocate sizes them).
    row_elems = kv_row_elems(setup.memory.kv_bytes_per_block_per_rank // ELEMENT_BYTES,
                             config.memory_scale, config.block_size)

    # A run whose every delay is followed by a TP collective has no pipeline transfers and
    # no back-to-back delays: nothing of the run-shaped pipeline probe prices it, so that
    # probe keeps calibrate's short single-delay program (its stages would run up to
    # PIPELINE_BUSY_S a plan, ~25 s more per validate at TP=2, dilation 50).
    pipelined = config.pp > 1 or config.tp == 1

    def probe() -> None:
        probes.append(probe_host(max(2, config.tp), profile, address=config.address,
                                 timeout_s=config.timeout_s, host_mode=HostMode.of(config),
                                 num_bytes=num_bytes,
                                 pipeline_template=template if pipelined else None,
                                 dilation=config.dilation, gather_bytes=gather,
                                 gap_model=(config.model, config.hardware),
                                 pipeline_gap=config.pp > 1,
                                 kv_rows=template.num_tokens if template is not None else None,
                                 kv_row_elems=row_elems,
                                 pipeline_warm_bytes=largest if pipelined else None,
                                 # the run's transfers by size (a TP-only run has none)
                                 pipeline_sizes=quartiles if config.pp > 1 else ()))

    if host_probe:
        probe()
    emu_writer = RunWriter(outdir / "emulate")

    def flush(tables, exc):
        emu_writer.flush_partial(requests=tables.requests, steps=tables.steps,
                                 collectives=tables.collectives, mode="emulate",
                                 config=config, extra=tables.extra, error=exc)

    emu = emulate(setup, on_progress=on_progress, on_partial=flush)
    nodes = emu.extra.pop("nodes", None)
    emu_writer.finish(requests=emu.requests, steps=emu.steps, collectives=emu.collectives,
                      mode="emulate", config=config, nodes=nodes, extra=emu.extra)
    probed = None
    if host_probe:
        probe()
        before, after = probes
        factors = {op: (before.line_factors[op] + after.line_factors[op]) / 2
                   for op in before.line_factors}
        refreshed = (", lines of " + ", ".join(sorted(factors)) + " re-measured"
                     if factors else "")
        profile = profile.lines_scaled(factors).model_copy(update={
            "host": before.host.averaged(after.host),
            "name": f"{profile.name} (host overheads{refreshed}: mean of probes before "
                    "and after)"})
        save_profile(profile, outdir / "host-profile.json")
        line_s = profile.time_s("all_reduce", max(2, config.tp), "intra", num_bytes)
        probed = {"num_bytes": num_bytes, "before": before.host.model_dump(),
                  "after": after.host.model_dump(),
                  "drift": probe_drift(before.host, after.host, line_s),
                  "gather_bytes": gather,
                  "line_factors": {"before": before.line_factors,
                                   "after": after.line_factors, "mean": factors}}
    return report_runs(config, profile, outdir, emu, nodes, probed)


def report_runs(config: RunConfig, profile: CommProfile, outdir: Path, emu: RunTables,
                nodes: dict | list | None, probes: dict | None = None, *,
                thermometer: bool = True) -> dict[str, Any]:
    """Simulate, write simulate/, join with ``emu`` and write the report (with ``probes``,
    the host probes around the emulation, when given) and the plot; with ``thermometer``
    and probes in the run, priced again with the speed they measured."""
    from emulator.validate.plot import plot_validation

    while isinstance(nodes, dict):  # WorkerGroup.nodes_summary()
        nodes = nodes.get("rank_node_id") or nodes.get("rank_node_ip")
    report, joined = _simulate_and_report(config, profile, outdir / "simulate", emu, nodes)
    shifts = thermometer_shifts(report["thermometer"], config.dilation) if thermometer else {}
    driver = (driver_thermometer(emu.extra.get("control"), profile.host)
              if thermometer and config.pp > 1 else None)
    if not shifts and driver is None:  # a re-report without it leaves no stale re-pricing
        shutil.rmtree(outdir / "simulate-thermometer", ignore_errors=True)
    else:
        # Re-price with the speed the run's own probes measured (the group collectives'
        # lines; with PP the gap between a micro-batch's steps by the driver's speed) and
        # report that, keeping the as-calibrated errors beside it.
        calibrated = report
        said = []
        if shifts:
            profile = profile.lines_shifted(shifts)
            said.append(f"group collectives {shifts['all_reduce'] * 1e6:+.0f} us a call")
        if driver is not None:
            host = profile.host.model_copy(
                update={"step_gap_s": profile.host.step_gap_s * driver["factor"]})
            profile = profile.model_copy(update={"host": host})
            said.append(f"pipeline round trip x{driver['factor']:.2f} by the driver's speed")
        profile = profile.model_copy(update={"name": f"{profile.name} (re-priced by the "
                                                     "run's thermometer)"})
        report, joined = _simulate_and_report(config, profile, outdir / "simulate-thermometer",
                                              emu, nodes)
        report["thermometer"] = calibrated["thermometer"]
        if shifts:
            report["thermometer_shift_s"] = shifts
        if driver is not None:
            report["driver_thermometer"] = driver
        report["as_calibrated"] = {k: calibrated[k] for k in AS_CALIBRATED_KEYS}
        head, rest = report["verdict"].split(": ", 1)
        report["verdict"] = (f"{head} with the run's thermometer ({'; '.join(said)}): "
                             f"{rest}; as calibrated: "
                             + calibrated["verdict"].split(": ", 1)[0])
    if probes is not None:
        report["host_probes"] = probes
        report["verdict"] += f"; host drift {probes['drift'] * 100:+.1f}% between the probes"
        factors = (probes.get("line_factors", {}).get("mean", {})
                   if probes.get("line_factors_applied", True) else {})
        for op, factor in sorted(factors.items()):
            report["verdict"] += f"; {op} line x{factor:.2f} re-measured around the run"
    # What the ranks' sockets ran on (runtime.worker.host_tcp_congestion). BBR paces a
    # socket by its own recent traffic, so a run's sparse transfers can differ from the
    # probes' (docs/results-validation.md, repeat 18): said in the verdict.
    congestion = sorted({m["tcp_congestion"] for m in emu.extra.get("host_mode") or []
                         if m.get("tcp_congestion")})
    if congestion:
        report["tcp_congestion"] = congestion
        if "bbr" in congestion:
            report["verdict"] += "; the ranks' TCP is bbr (paced by each socket's history)"
    write_json_atomic(outdir / "validation.json", report)
    plot_validation(joined, report, outdir / "validation.png")
    return report
