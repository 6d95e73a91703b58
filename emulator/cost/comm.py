"""Alpha-beta communication costs per collective, from a :class:`CommProfile`.

A profile holds one straight line ``time_s = alpha_s + bytes * (beta_s_per_byte +
gamma_s_per_byte)`` per (op, group size, placement), optionally continued by further
segments from given sizes on (``CommEntry.pieces``: a calibrated profile's measured curve).
The line is *collective level*: it
already contains the algorithm's step count, so a calibrated profile (``emulator
calibrate``, measured on the host) and one derived from hardware specs are used the same way.

Byte conventions (the ``bytes`` argument of every op; nccl-tests' "size" conventions,
https://github.com/NVIDIA/nccl-tests/blob/master/doc/PERFORMANCE.md):

- ``all_reduce``: the buffer size on each rank.
- ``all_gather``: the gathered output size (group size x per-rank shard).
- ``all_to_all``: the busiest rank: max over ranks of the bytes it sends to, or receives
  from, the *other* ranks (see :func:`all_to_all_bytes`).
- ``send_recv``: the message size (group size is always 2).

From hardware specs (:meth:`CommProfile.from_hardware`), with link bandwidth ``bw`` (per GPU,
per direction) and latency ``lat`` of the scale-up (intra-node) or scale-out (inter-node)
fabric, the classic ring / pairwise formulas (Thakur, Rabenseifner, Gropp, "Optimization of
Collective Communication Operations in MPICH", IJHPCA 2005; Patarasuk & Yuan, "Bandwidth
optimal all-reduce algorithms", JPDC 2009):

- all_reduce (ring reduce-scatter + all-gather): ``2(n-1) lat + 2(n-1)/n * bytes / bw``
- all_gather (ring): ``(n-1) lat + (n-1)/n * bytes / bw``
- all_to_all (all pairs at once through a switch): ``lat + bytes / bw``
- send_recv: ``lat + bytes / bw``

The reduction term ``gamma`` is 0 from specs (GPU reduction is far faster than the link) and
may be non-zero in a calibrated profile (CPU gloo).

Placement: a group is "inter" when its ranks sit on more than one node (node = rank //
gpus_per_node, ranks numbered by the layout's mesh), else "intra".

Host profiles and units. ``emulator calibrate`` measures the lines on the emulator's host in
*host* seconds, plus the host's per-step overheads (:class:`HostOverhead`: the driver's
round trip between steps, sleep overshoot per compute delay, straggler wait per collective),
which only exist on an emulator and are used only by ``emulator validate``. The emulator's
tables are in host seconds / ``dilation`` while its collectives run undilated, so to predict
an emulation the simulator prices compute x1 and communication and overheads x 1/dilation:
``validate`` uses ``profile.scaled(1 / dilation)``. ``simulate --comm-profile host.json``
uses the lines unscaled (the host fabric against the target's compute).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from emulator.errors import ConfigError

CommOp = Literal["all_reduce", "all_gather", "all_to_all", "send_recv"]
Placement = Literal["intra", "inter"]
COMM_OPS: tuple[str, ...] = ("all_reduce", "all_gather", "all_to_all", "send_recv")
PLACEMENTS: tuple[str, ...] = ("intra", "inter")
PROFILE_SCHEMA_VERSION = 1


class ProfileError(ConfigError):
    """A communication profile is malformed or lacks an entry the run needs."""


class LinePiece(BaseModel):
    """A further segment of a :class:`CommEntry`'s line, for sizes from ``from_bytes`` on."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    from_bytes: float = Field(gt=0, description="Smallest size (the op's byte convention) "
                              "priced by this segment.")
    alpha_s: float = Field(description="Intercept of this segment's line, seconds (may be "
                           "negative for a steep segment; its times are not).")
    slope_s_per_byte: float = Field(ge=0.0, description="Seconds per byte of this segment.")

    @model_validator(mode="after")
    def _positive(self) -> LinePiece:
        if self.alpha_s + self.from_bytes * self.slope_s_per_byte <= 0:
            raise ValueError(f"the piece from {self.from_bytes:g} bytes prices its first size "
                             f"at {self.alpha_s + self.from_bytes * self.slope_s_per_byte:g} s "
                             "(must be > 0)")
        return self


class CommEntry(BaseModel):
    """One alpha-beta line: the time of ``op`` over ``group_size`` ranks at ``placement``;
    optionally in segments (``pieces``) where the library switches algorithm."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    op: CommOp = Field(description="Collective: all_reduce, all_gather, all_to_all or send_recv.")
    group_size: int = Field(ge=2, description="Number of ranks in the group (2 for send_recv).")
    placement: Placement = Field(
        description="'intra' (all ranks on one node, scale-up link) or 'inter' (spans nodes).")
    alpha_s: float = Field(ge=0.0, description="Fixed cost per call in seconds (latency term).")
    beta_s_per_byte: float = Field(
        ge=0.0, description="Seconds per byte of the op's nominal size (bandwidth term).")
    gamma_s_per_byte: float = Field(
        default=0.0, ge=0.0,
        description="Extra seconds per byte for the reduction arithmetic (0 from specs).")
    pieces: list[LinePiece] = Field(
        default_factory=list, description="Further segments, ascending from_bytes: from a "
        "piece's size on, its own alpha and slope apply (alpha_s/beta/gamma price the sizes "
        "below the first). A calibrated profile carries its measured per-size medians this way "
        "(calibrate.fit.measured_pieces): the library switches algorithm with the size.")
    shift_s: float = Field(
        default=0.0, description="Added to every call, seconds, may be negative (a call never "
        "costs less than 0): `validate` re-prices a run with the speed its thermometer "
        "probes measured (0 in calibrated and spec profiles).")

    _starts: list[float] = PrivateAttr(default_factory=list)

    def time_s(self, num_bytes: float) -> float:
        """Predicted time of one call moving ``num_bytes`` (0 bytes costs nothing)."""
        if num_bytes <= 0:
            return 0.0
        # The simulator prices every step's collectives here: bisect the pieces' starts
        # (read only when there are pieces: a private attribute costs a pydantic lookup).
        k = bisect_right(self._starts, num_bytes) if self.pieces else 0
        if k:
            piece = self.pieces[k - 1]
            t = piece.alpha_s + num_bytes * piece.slope_s_per_byte
        else:
            t = self.alpha_s + num_bytes * (self.beta_s_per_byte + self.gamma_s_per_byte)
        return t if not self.shift_s else max(0.0, t + self.shift_s)

    def scaled(self, factor: float) -> CommEntry:
        """Every time multiplied by ``factor`` (sizes unchanged)."""
        return self.model_copy(update={
            "alpha_s": self.alpha_s * factor, "beta_s_per_byte": self.beta_s_per_byte * factor,
            "gamma_s_per_byte": self.gamma_s_per_byte * factor,
            "shift_s": self.shift_s * factor,
            "pieces": [p.model_copy(update={"alpha_s": p.alpha_s * factor,
                                            "slope_s_per_byte": p.slope_s_per_byte * factor})
                       for p in self.pieces]})

    def shifted(self, shift_s: float) -> CommEntry:
        """Every call ``shift_s`` seconds longer (shorter when negative, never below 0)."""
        return self.model_copy(update={"shift_s": self.shift_s + shift_s})

    @model_validator(mode="after")
    def _send_recv_pairs(self) -> CommEntry:
        if self.op == "send_recv" and self.group_size != 2:
            raise ValueError("send_recv entries must have group_size 2")
        starts = [p.from_bytes for p in self.pieces]
        if any(b <= a for a, b in zip(starts, starts[1:])):
            raise ValueError("pieces must have strictly ascending from_bytes")
        self._starts = starts
        return self


class P2PWakeCurves(BaseModel):
    """The pipeline wake-up curves of HostOverhead (its ``p2p_*`` fields) probed with
    transfers of one size (HostOverhead.p2p_by_size), on HostOverhead.p2p_idle_grid_s."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_bytes: int = Field(ge=1, description="Bytes of the probe's transfers.")
    wake_s: list[float] = Field(description="As HostOverhead.p2p_wake_s (receiver idled).")
    send_wake_s: list[float] = Field(description="As HostOverhead.p2p_send_wake_s (sender "
                                     "idled).")
    recv_idle_s: list[float] = Field(description="As HostOverhead.p2p_recv_idle_s: the x of "
                                     "wake_s.")
    send_idle_s: list[float] = Field(description="As HostOverhead.p2p_send_idle_s: the x of "
                                     "send_wake_s.")

    def wake(self, idle_s: np.ndarray, sender_waited: np.ndarray | bool) -> np.ndarray:
        return _side_wake(idle_s, sender_waited, self.recv_idle_s, self.wake_s,
                          self.send_idle_s, self.send_wake_s)


class HostOverhead(BaseModel):
    """Costs of the emulator's host beyond compute delays and collective transfers (host
    seconds; measured by ``emulator calibrate``'s probe steps, see calibrate/host.py).

    On a shared host a compute delay overshoots, and a collective that follows a delay is
    slower than back to back (the microbenchmark's line): its ranks' communication threads
    were idle and must be scheduled again, and the group waits for the last rank (straggler
    sync-wait). Both depend on the delay's length, so they are tabulated on a grid of delay
    lengths and interpolated. The collective terms are measured against the benchmark's
    line, so they also carry the host's drift since the benchmark and can be negative. One
    stage of one step lasts::

        sum(delays) + sum(lines) + step_fixed_s (or p2p_stage_fixed_s) + kv_write_s
          + sum over delays of delay_excess(delay)
          + sum over group collectives of (collective_call_s
                                           + collective_excess(delay before it))
          + delay_gap_s per two consecutive delays with no collective between them

    and the next step starts ``step_gap_s + step_gap_s_per_collective * rows`` after the
    driver learns the previous one ended (rows: collective records shipped back)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_ranks: int = Field(ge=1, description="World size the overheads were measured on.")
    step_gap_s: float = Field(
        ge=0.0, description="Fixed driver round trip from the end of a step on the ranks to "
        "the start of the next one (result transfer, scheduling, submission).")
    step_gap_s_per_collective: float = Field(
        default=0.0, ge=0.0, description="Extra gap per collective record the ranks ship "
        "back (serialization and record keeping on the driver).")
    step_gap_driver_s: float | None = Field(
        default=None, ge=0.0, description="The driver's busy time per step (scheduling, "
        "pricing, submitting, record keeping: executor.ControlStats) while the probe of "
        "step_gap_s ran, host seconds; `validate` scales step_gap_s by a run's own over it "
        "(the driver's speed during the run). None: not measured.")
    step_fixed_s: float = Field(
        ge=0.0, description="Time inside one rank's step outside delays and collectives.")
    delay_grid_s: list[float] = Field(
        min_length=1, description="Compute-delay lengths probed, ascending.")
    delay_excess_s: list[float] = Field(
        description="Per grid point: mean excess of one compute delay over its nominal "
        "length (sleep overshoot and recording), with what runs between the delay and the next "
        "op in collective_call_s.")
    collective_call_s: float = Field(
        default=0.0, ge=0.0, description="Per group collective: the time between leaving a "
        "compute delay and entering the collective (Python, recording, buffer set-up); "
        "pipeline-only stages, whose delays follow each other, do not pay it.")
    kv_write_s: float = Field(
        default=0.0, ge=0.0, description="Per step and rank: writing the step's KV rows into "
        "the pool (index fill of its slots and the bookkeeping), which the worker does right "
        "after the first layer's attention delay, beyond an ordinary gap or call there. "
        "Measured by the host probes writing the rows of the run's median step; 0 in profiles "
        "written before it was.")
    delay_gap_s: float = Field(
        default=0.0, ge=0.0, description="Between two compute delays of a stage that follow "
        "each other with no collective between (pipeline-only stages): the time from the end "
        "of one to the start of the next (the layer loop, recording). Measured by the "
        "pipeline probe; 0 in profiles written before it was.")
    collective_excess_s: list[float] = Field(
        description="Per grid point: extra critical-path time of a group collective after "
        "such a delay, beyond the benchmark line (wake-up of idle ranks + straggler wait); "
        "negative when the probe's transfers beat the line: the host is faster now than "
        "when the benchmark ran (shared hosts drift), so a re-probe re-bases the lines at "
        "the probed size.")
    wake_s: list[float] = Field(
        description="Per grid point: the part of collective_excess_s inside the transfer "
        "(max exit - max entry) itself; the rest is straggler sync-wait.")
    thermometer_wake_s: list[float] | None = Field(
        default=None, description="Per grid point: the part inside the transfer of the "
        "excess of validate's thermometer (an all-reduce back to back after a group "
        "collective that followed a delay of that length, mid-step; StageWork.probe_bytes). "
        "In a probe script it took up to ~60 us more than the back-to-back calls of "
        "wake_s[0] after 2-6 ms delays (docs/results-validation.md, repeat 16). None: "
        "wake_s at 0.")
    p2p_idle_grid_s: list[float] | None = Field(
        default=None, description="Receiver idle times probed for p2p_wake_s, ascending (a "
        "pipeline stage can wait a whole stage, longer than any compute delay).")
    p2p_wake_s: list[float] | None = Field(
        default=None, description="Per p2p_idle_grid_s point: extra time of a send/recv whose "
        "receiver idled that long in its recv (a pipeline stage waiting for activations); "
        "None: use wake_s on delay_grid_s.")
    p2p_send_wake_s: list[float] | None = Field(
        default=None, description="Per p2p_idle_grid_s point: extra time of a send/recv whose "
        "sender idled that long in its send, waiting for the receiver to post its recv (a "
        "stage whose successor is still busy); None: use p2p_wake_s.")
    p2p_recv_idle_s: list[float] | None = Field(
        default=None, description="Per p2p_idle_grid_s point: the receiver's idle time the "
        "probe measured there (median), the x of p2p_wake_s; None: the grid itself. A probe "
        "sets each stage's delays, but the idle time a stage actually waits also holds the "
        "step boundary's costs, so the curve is placed at what was measured.")
    p2p_send_idle_s: list[float] | None = Field(
        default=None, description="Per p2p_idle_grid_s point: the sender's idle time the probe "
        "measured there (median), the x of p2p_send_wake_s; None: the grid itself.")
    p2p_stage_fixed_s: list[float] | None = Field(
        default=None, description="[first stage, receiving stage]: per step, a pipeline "
        "stage's time outside its delays, the gaps between them, its KV write and its "
        "transfers: the first stage from its step's start to its first delay plus from its "
        "last delay into its send, a receiving stage from its recv's end to its first delay "
        "plus from its last delay to its step's end. Measured by the pipeline probe; used "
        "instead of step_fixed_s for the stages of a pipeline without TP (a receiving stage "
        "starts when its activations arrive, so its step's prologue is hidden in the wait). "
        "None: step_fixed_s.")
    p2p_by_size: list[P2PWakeCurves] | None = Field(
        default=None, description="The pipeline wake-up curves per transfer size (ascending "
        "num_bytes, same grid), probed in a block of plans per size. A transfer of known size is "
        "priced by interpolating them linearly in bytes (flat outside), the other p2p_* "
        "curves being the ones at the run's median step's size. On the development VM, "
        "sender-waited transfers of 128 KiB and more cost 50-80 us more after ~16 ms idle than "
        "smaller ones, once the sockets had carried a prefill (docs/results-validation.md, "
        "repeats 15-16). None: one size for all.")

    @model_validator(mode="after")
    def _grid(self) -> HostOverhead:
        n = len(self.delay_grid_s)
        if any(len(v) != n for v in (self.delay_excess_s, self.collective_excess_s,
                                     self.wake_s)):
            raise ValueError("delay_excess_s, collective_excess_s and wake_s need one value "
                             "per delay_grid_s point")
        if self.thermometer_wake_s is not None and len(self.thermometer_wake_s) != n:
            raise ValueError("thermometer_wake_s needs one value per delay_grid_s point")
        if (self.p2p_wake_s is None) != (self.p2p_idle_grid_s is None) or (
                self.p2p_wake_s is not None
                and len(self.p2p_wake_s) != len(self.p2p_idle_grid_s)):
            raise ValueError("p2p_wake_s needs one value per p2p_idle_grid_s point")
        if self.p2p_send_wake_s is not None and (
                self.p2p_wake_s is None or len(self.p2p_send_wake_s) != len(self.p2p_wake_s)):
            raise ValueError("p2p_send_wake_s needs p2p_wake_s and one value per "
                             "p2p_idle_grid_s point")
        if self.p2p_stage_fixed_s is not None and len(self.p2p_stage_fixed_s) != 2:
            raise ValueError("p2p_stage_fixed_s needs two values: first stage, receiving stage")
        for name in ("p2p_recv_idle_s", "p2p_send_idle_s"):
            xs = getattr(self, name)
            if xs is not None and (self.p2p_idle_grid_s is None
                                   or len(xs) != len(self.p2p_idle_grid_s)):
                raise ValueError(f"{name} needs one value per p2p_idle_grid_s point")
        if self.p2p_by_size is not None:
            sizes = [c.num_bytes for c in self.p2p_by_size]
            if self.p2p_idle_grid_s is None or not sizes:
                raise ValueError("p2p_by_size needs p2p_idle_grid_s and at least one size")
            if any(b <= a for a, b in zip(sizes, sizes[1:])):
                raise ValueError("p2p_by_size must be strictly ascending in num_bytes")
            n = len(self.p2p_idle_grid_s)
            if any(len(v) != n for c in self.p2p_by_size for v in (
                    c.wake_s, c.send_wake_s, c.recv_idle_s, c.send_idle_s)):
                raise ValueError("p2p_by_size's curves need one value per p2p_idle_grid_s "
                                 "point")
        for name in ("delay_grid_s", "p2p_idle_grid_s"):
            grid = getattr(self, name) or []
            if any(b <= a for a, b in zip(grid, grid[1:])):
                raise ValueError(f"{name} must be strictly ascending")
        return self

    def delay_excess(self, delay_s: np.ndarray) -> np.ndarray:
        """Excess of compute delays of these lengths (linear between grid points, flat
        outside)."""
        return np.interp(delay_s, self.delay_grid_s, self.delay_excess_s)

    def collective_excess(self, delay_s: np.ndarray) -> np.ndarray:
        return np.interp(delay_s, self.delay_grid_s, self.collective_excess_s)

    def wake(self, delay_s: np.ndarray) -> np.ndarray:
        return np.interp(delay_s, self.delay_grid_s, self.wake_s)

    def thermometer_wake(self, delay_s: np.ndarray) -> np.ndarray:
        """The thermometer's transfer excess after a collective that followed a delay of
        ``delay_s`` (wake(0) without a measurement)."""
        if self.thermometer_wake_s is None:
            return self.wake(np.zeros_like(np.asarray(delay_s, dtype=np.float64)))
        return np.interp(delay_s, self.delay_grid_s, self.thermometer_wake_s)

    def p2p_wake(self, idle_s: np.ndarray, sender_waited: np.ndarray | bool = False,
                 num_bytes: np.ndarray | float | None = None) -> np.ndarray:
        """Extra time of a send/recv after its first-arriving side idled ``idle_s`` in the op
        (the receiver, or with ``sender_waited`` the sender); with ``num_bytes`` (the
        transfer's size) and ``p2p_by_size``, interpolated between the sizes probed."""
        if self.p2p_by_size is not None and num_bytes is not None:
            idle, waited, size = np.broadcast_arrays(
                np.asarray(idle_s, dtype=np.float64), np.asarray(sender_waited, dtype=bool),
                np.asarray(num_bytes, dtype=np.float64))
            per = np.stack([c.wake(idle, waited) for c in self.p2p_by_size])  # [sizes, ...]
            sizes = np.array([c.num_bytes for c in self.p2p_by_size], dtype=np.float64)
            if sizes.size == 1:
                return per[0]
            hi = np.clip(np.searchsorted(sizes, size), 1, sizes.size - 1)
            w = np.clip((size - sizes[hi - 1]) / (sizes[hi] - sizes[hi - 1]), 0.0, 1.0)
            at = lambda k: np.take_along_axis(per, k[None], axis=0)[0]  # noqa: E731
            return at(hi - 1) * (1.0 - w) + at(hi) * w
        if self.p2p_wake_s is None:
            return self.wake(idle_s)
        # an older profile's gaps: the idle grid for unmeasured idle times, the receiver's
        # curve for a missing sender's
        recv_x = self.p2p_recv_idle_s or self.p2p_idle_grid_s
        send, send_x = ((self.p2p_wake_s, recv_x) if self.p2p_send_wake_s is None else
                        (self.p2p_send_wake_s, self.p2p_send_idle_s or self.p2p_idle_grid_s))
        return _side_wake(idle_s, sender_waited, recv_x, self.p2p_wake_s, send_x, send)

    def averaged(self, other: HostOverhead) -> HostOverhead:
        """The mean of two probes of the same grids (every time field, element by element):
        the host between them, e.g. during a run probed before and after."""
        sizes = lambda h: h.p2p_by_size and [c.num_bytes for c in h.p2p_by_size]  # noqa: E731
        if (self.delay_grid_s != other.delay_grid_s
                or self.p2p_idle_grid_s != other.p2p_idle_grid_s
                or self.num_ranks != other.num_ranks or sizes(self) != sizes(other)):
            raise ValueError("averaged needs two probes of the same grids, sizes and world "
                             "size")
        mine, theirs = self.model_dump(), other.model_dump()
        update: dict = {}
        if self.p2p_by_size is not None:
            update["p2p_by_size"] = [c.model_copy(update={
                k: [(a + b) / 2 for a, b in zip(getattr(c, k), getattr(d, k))]
                for k in _CURVE_TIMES}) for c, d in zip(self.p2p_by_size, other.p2p_by_size)]
        for k, v in mine.items():
            if k in ("num_ranks", "delay_grid_s", "p2p_idle_grid_s", "p2p_by_size") \
                    or v is None:
                continue
            w = theirs[k]
            if w is None:
                continue
            update[k] = ([(a + b) / 2 for a, b in zip(v, w)] if isinstance(v, list)
                         else (v + w) / 2)
        return self.model_copy(update=update)

    def scaled(self, factor: float) -> HostOverhead:
        """Every time (the grid too) multiplied by ``factor`` (1 / dilation: target units)."""
        update = {k: getattr(self, k) * factor for k in (
            "step_gap_s", "step_gap_s_per_collective", "step_fixed_s", "collective_call_s",
            "delay_gap_s", "kv_write_s")}
        update.update({k: [v * factor for v in getattr(self, k)] for k in (
            "delay_grid_s", "delay_excess_s", "collective_excess_s", "wake_s")})
        for k in ("p2p_wake_s", "p2p_idle_grid_s", "p2p_send_wake_s", "p2p_recv_idle_s",
                  "p2p_send_idle_s", "p2p_stage_fixed_s", "thermometer_wake_s"):
            if getattr(self, k) is not None:
                update[k] = [v * factor for v in getattr(self, k)]
        if self.p2p_by_size is not None:  # times scaled; the sizes are bytes
            update["p2p_by_size"] = [c.model_copy(update={
                k: [v * factor for v in getattr(c, k)] for k in _CURVE_TIMES})
                for c in self.p2p_by_size]
        return self.model_copy(update=update)


_CURVE_TIMES = ("wake_s", "send_wake_s", "recv_idle_s", "send_idle_s")
"""P2PWakeCurves' time fields (HostOverhead.averaged and scaled)."""


def _side_wake(idle_s, sender_waited, recv_x: list[float], recv: list[float],
               send_x: list[float], send: list[float]) -> np.ndarray:
    """A pipeline transfer's wake-up: the sender's curve where ``sender_waited``, else the
    receiver's, each at ``idle_s`` (HostOverhead.p2p_wake, P2PWakeCurves.wake)."""
    return np.where(sender_waited, _interp_measured(idle_s, send_x, send),
                    _interp_measured(idle_s, recv_x, recv))


def _interp_measured(x: np.ndarray, xp: list[float], fp: list[float]) -> np.ndarray:
    """np.interp on points whose x were measured (ascending by construction of the probe's
    grid, but two neighbours can swap by noise): the points sorted by x first."""
    order = np.argsort(np.asarray(xp, dtype=np.float64), kind="stable")
    return np.interp(x, np.asarray(xp, dtype=np.float64)[order],
                     np.asarray(fp, dtype=np.float64)[order])


class CommProfile(BaseModel):
    """Alpha-beta lines per (op, group size, placement); see the module docstring."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: int = Field(
        default=PROFILE_SCHEMA_VERSION,
        description=f"Profile file format version (this code reads {PROFILE_SCHEMA_VERSION}).")
    name: str = Field(description="Where the numbers come from (hardware id or host name).")
    entries: list[CommEntry] = Field(
        min_length=1, description="Measured or derived alpha-beta lines.")
    host: HostOverhead | None = Field(
        default=None, description="Emulator host overheads (calibrated profiles only; used "
        "by `emulator validate`).")

    _index: dict[tuple[str, str], dict[int, CommEntry]] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> CommProfile:
        if self.schema_version != PROFILE_SCHEMA_VERSION:
            raise ValueError(f"schema_version {self.schema_version} is not supported; "
                             f"this code reads version {PROFILE_SCHEMA_VERSION}")
        index: dict[tuple[str, str], dict[int, CommEntry]] = {}
        for entry in self.entries:
            sizes = index.setdefault((entry.op, entry.placement), {})
            if entry.group_size in sizes:
                raise ValueError(f"duplicate entry for op={entry.op} placement="
                                 f"{entry.placement} group_size={entry.group_size}")
            sizes[entry.group_size] = entry
        self._index = index
        return self

    @classmethod
    def from_hardware(cls, hardware, max_group_size: int = 64) -> CommProfile:
        """Ring / pairwise alpha-beta lines from ``hardware``'s link specs for every group
        size 2..max_group_size and both placements (see the module docstring)."""
        links = {
            "intra": (hardware.scale_up_latency_s, hardware.scale_up_bytes_per_s),
            "inter": (hardware.scale_out_latency_s, hardware.scale_out_bytes_per_s),
        }
        entries = []
        for placement, (lat, bw) in links.items():
            entries.append(CommEntry(op="send_recv", group_size=2, placement=placement,
                                     alpha_s=lat, beta_s_per_byte=1.0 / bw))
            for n in range(2, max(2, max_group_size) + 1):
                entries += [
                    CommEntry(op="all_reduce", group_size=n, placement=placement,
                              alpha_s=2 * (n - 1) * lat,
                              beta_s_per_byte=2 * (n - 1) / n / bw),
                    CommEntry(op="all_gather", group_size=n, placement=placement,
                              alpha_s=(n - 1) * lat, beta_s_per_byte=(n - 1) / n / bw),
                    CommEntry(op="all_to_all", group_size=n, placement=placement,
                              alpha_s=lat, beta_s_per_byte=1.0 / bw),
                ]
        return cls(name=f"specs:{hardware.name}", entries=entries)

    def scaled(self, factor: float) -> CommProfile:
        """A profile with every time (alpha, beta, gamma and the host overheads) multiplied
        by ``factor``; ``validate`` uses ``1 / dilation`` (see the module docstring)."""
        if not factor > 0:
            raise ValueError(f"scale factor must be > 0, got {factor}")
        entries = [e.scaled(factor) for e in self.entries]
        host = self.host.scaled(factor) if self.host is not None else None
        return CommProfile(name=f"{self.name} x{factor:g}", entries=entries, host=host)

    def lines_shifted(self, shifts_s: dict[str, float], name: str | None = None
                      ) -> CommProfile:
        """A profile whose lines of each op in ``shifts_s`` cost that many seconds more per
        call (less when negative; a call never below 0 s; other ops and the host overheads
        unchanged): `validate` re-prices a run with the speed its thermometer probes
        measured."""
        entries = [e.shifted(shifts_s[e.op]) if e.op in shifts_s else e for e in self.entries]
        return CommProfile(name=name or self.name, entries=entries, host=self.host)

    def lines_scaled(self, factors: dict[str, float], name: str | None = None
                     ) -> CommProfile:
        """A profile whose lines of each op in ``factors`` take that many times as long
        (other ops and the host overheads unchanged): `validate` prices the logits
        all-gather with the factor its host probes measured at the run's size around the run
        (calibrate.host.measure_host_overhead)."""
        bad = {op: f for op, f in factors.items() if not f > 0}
        if bad:
            raise ValueError(f"line factors must be > 0, got {bad}")
        entries = [e.scaled(factors[e.op]) if e.op in factors else e for e in self.entries]
        return CommProfile(name=name or self.name, entries=entries, host=self.host)

    def lookup(self, op: str, group_size: int, placement: str) -> CommEntry:
        """The entry for exactly ``group_size``, else the nearest measured size (ties go to
        the larger group, the more expensive one). Raises ProfileError when the profile has
        no entry at all for (op, placement)."""
        sizes = self._index.get((op, placement))
        if not sizes:
            have = sorted({f"{o}/{p}" for (o, p) in self._index})
            raise ProfileError(
                f"communication profile '{self.name}' has no '{op}' entries for placement "
                f"'{placement}' (has: {', '.join(have)}); calibrate that op and placement or "
                f"use the hardware-spec profile")
        if group_size in sizes:
            return sizes[group_size]
        nearest = min(sizes, key=lambda n: (abs(n - group_size), -n))
        return sizes[nearest]

    def time_s(self, op: str, group_size: int, placement: str, num_bytes: float) -> float:
        """Time of one ``op`` call over ``group_size`` ranks; 0 for a group of 1 or 0 bytes."""
        if group_size <= 1 or num_bytes <= 0:
            return 0.0
        return self.lookup(op, group_size, placement).time_s(num_bytes)


def node_of(ranks: Iterable[int], gpus_per_node: int) -> np.ndarray:
    """Node index of each rank (ranks are numbered node by node)."""
    return np.asarray(list(ranks), dtype=np.int64) // gpus_per_node


def placement_of(ranks: Iterable[int], gpus_per_node: int) -> Placement:
    """'inter' when the group's ranks sit on more than one node, else 'intra'."""
    nodes = node_of(ranks, gpus_per_node)
    return "inter" if nodes.size and nodes.min() != nodes.max() else "intra"


def all_to_all_bytes(send_bytes: np.ndarray) -> int:
    """Busiest-rank size of an all-to-all: ``send_bytes[i, j]`` is what rank i sends to rank
    j; the result is the max over ranks of bytes sent to, or received from, other ranks (a
    rank's own chunk does not cross the wire)."""
    matrix = np.asarray(send_bytes, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"send_bytes must be a square [n, n] matrix, got {matrix.shape}")
    off = matrix - np.diag(np.diag(matrix))
    return int(max(off.sum(axis=1).max(initial=0.0), off.sum(axis=0).max(initial=0.0)))
