"""What a worker sends back to the driver: columnar per-step records and, after a failure,
its collective state.

Records are numpy columns (one row per collective or compute delay) so a step's payload
through Ray stays a few KiB even with hundreds of layers; a rank packs them as two flat
buffers (StepRecorder.pack) and the driver unpacks them into columns. Times are seconds on
the driver's monotonic clock: the worker's ``time.monotonic_ns`` plus the clock offset the
driver set for its node (0 on the driver's node, where all processes share CLOCK_MONOTONIC).
"""

from __future__ import annotations

import pickle
from array import array
from dataclasses import dataclass, field

import numpy as np

OPS = ("all_reduce", "all_gather", "send", "recv", "all_to_all")
"""Collective op names; ``StepRecords.coll_op`` holds indices into this tuple."""
AXES = ("tp", "pp", "ep", "dp", "world")
"""Mesh axis names; ``StepRecords.coll_axis`` holds indices into this tuple."""
COMPUTE_KINDS = ("pre", "attn", "mlp", "post")
"""Compute delay kinds; ``StepRecords.comp_kind`` holds indices into this tuple.
pre = embedding (stage 0), attn = norm+QKV+attention+output projection, mlp = MLP or
experts, post = final norm + LM head + sampling (last stage)."""

NO_LAYER = -1
"""``coll_layer`` / ``comp_layer`` of work that belongs to no decoder layer (embedding,
logits, pipeline transfers)."""

PROBE_LAYER = -2
"""``coll_layer`` of a thermometer probe (StageWork.probe_bytes): a back-to-back collective
that measures the host's collective speed during the run."""


@dataclass(slots=True)
class StepRecords:
    """One rank's measurements for one ``run_step``."""

    rank: int
    stage: int
    step_key: object
    """Opaque key the driver passed (e.g. ``(replica, step, micro_batch)``)."""
    start_s: float
    """When ``run_step`` began on this rank (before a pipeline recv)."""
    end_s: float
    """When the rank finished its part of the step (after its last send or gather)."""
    compute_s: float
    """Sum of the compute delays actually slept (measured, not requested)."""
    num_tokens: int
    num_sampled_tokens: int
    num_kv_rows_written: int
    """KV pool rows (slots) written this step: len(slot_ids), 0 without slot ids."""
    coll_op: np.ndarray = field(repr=False)
    """int8 [C]: index into OPS."""
    coll_axis: np.ndarray = field(repr=False)
    """int8 [C]: index into AXES."""
    coll_layer: np.ndarray = field(repr=False)
    """int32 [C]: global layer index, or NO_LAYER."""
    coll_peer: np.ndarray = field(repr=False)
    """int32 [C]: the other rank of a send/recv; -1 for group collectives."""
    coll_bytes: np.ndarray = field(repr=False)
    """int64 [C]: bytes this rank contributes (all_gather: its shard, not the output)."""
    coll_entry_s: np.ndarray = field(repr=False)
    """float64 [C]: when the rank called the op."""
    coll_exit_s: np.ndarray = field(repr=False)
    """float64 [C]: when the op returned on this rank."""
    comp_kind: np.ndarray = field(repr=False)
    """int8 [K]: index into COMPUTE_KINDS."""
    comp_layer: np.ndarray = field(repr=False)
    """int32 [K]: global layer index, or NO_LAYER."""
    comp_start_s: np.ndarray = field(repr=False)
    """float64 [K]"""
    comp_end_s: np.ndarray = field(repr=False)
    """float64 [K]"""

    @classmethod
    def from_rows(cls, meta: tuple, coll: np.ndarray, comp: np.ndarray) -> StepRecords:
        """From a StepRecorder's flat rows (float64, COLL_FIELDS / COMP_FIELDS per row) and
        ``meta`` = (rank, stage, step_key, start_s, end_s, num_tokens, num_sampled_tokens,
        num_kv_rows_written)."""
        rank, stage, step_key, start_s, end_s, num_tokens, num_sampled, num_kv = meta
        c = coll.reshape(-1, COLL_FIELDS)
        k = comp.reshape(-1, COMP_FIELDS)
        comp_start, comp_end = k[:, 2].copy(), k[:, 3].copy()
        return cls(
            rank=rank, stage=stage, step_key=step_key, start_s=start_s, end_s=end_s,
            compute_s=float((comp_end - comp_start).sum()), num_tokens=num_tokens,
            num_sampled_tokens=num_sampled, num_kv_rows_written=num_kv,
            coll_op=c[:, 0].astype(np.int8), coll_axis=c[:, 1].astype(np.int8),
            coll_layer=c[:, 2].astype(np.int32), coll_peer=c[:, 3].astype(np.int32),
            coll_bytes=c[:, 4].astype(np.int64), coll_entry_s=c[:, 5].copy(),
            coll_exit_s=c[:, 6].copy(), comp_kind=k[:, 0].astype(np.int8),
            comp_layer=k[:, 1].astype(np.int32), comp_start_s=comp_start,
            comp_end_s=comp_end)

    @classmethod
    def unpack(cls, payload: bytes) -> StepRecords:
        """The records :meth:`StepRecorder.pack` packed."""
        meta, coll, comp = pickle.loads(payload)
        return cls.from_rows(meta, np.frombuffer(coll, dtype=np.float64),
                             np.frombuffer(comp, dtype=np.float64))

    @property
    def num_collectives(self) -> int:
        return int(self.coll_op.shape[0])

    def count(self, op: str, axis: str | None = None) -> int:
        """Number of collectives of ``op`` (optionally on ``axis``) in this step."""
        mask = self.coll_op == OPS.index(op)
        if axis is not None:
            mask &= self.coll_axis == AXES.index(axis)
        return int(mask.sum())


COLL_FIELDS = 7
"""Values per collective row of a StepRecorder: op, axis, layer, peer, bytes, entry, exit."""
COMP_FIELDS = 4
"""Values per compute row of a StepRecorder: kind, layer, start, end."""


class StepRecorder:
    """Appends rows while a step runs and freezes them into :class:`StepRecords`, or packs
    them for the driver (:meth:`pack`, :meth:`StepRecords.unpack`).

    Rows go into flat ``array('d')`` buffers (every value is exact in a double: small ints,
    byte counts below 2**53, clock seconds), so that packing a step costs two memory copies
    at the step's end, where the rank's time is not hidden inside a delay."""

    __slots__ = ("_coll", "_comp")

    def __init__(self) -> None:
        self._coll = array("d")
        self._comp = array("d")

    def add_collective(self, op: int, axis: int, layer: int, peer: int, num_bytes: int,
                       entry_s: float, exit_s: float) -> None:
        self._coll.extend((op, axis, layer, peer, num_bytes, entry_s, exit_s))

    def add_compute(self, kind: int, layer: int, start_s: float, end_s: float) -> None:
        self._comp.extend((kind, layer, start_s, end_s))

    def freeze(self, *, rank: int, stage: int, step_key: object, start_s: float, end_s: float,
               num_tokens: int, num_sampled_tokens: int, num_kv_rows_written: int
               ) -> StepRecords:
        return StepRecords.from_rows(
            (rank, stage, step_key, start_s, end_s, num_tokens, num_sampled_tokens,
             num_kv_rows_written),
            np.array(self._coll, dtype=np.float64), np.array(self._comp, dtype=np.float64))

    def pack(self, *, rank: int, stage: int, step_key: object, start_s: float, end_s: float,
             num_tokens: int, num_sampled_tokens: int, num_kv_rows_written: int) -> bytes:
        """What :meth:`freeze` returns, as bytes for :meth:`StepRecords.unpack`. For a step
        of ~130 rows on the development VM, timed in a loop: 2 us, where freezing twelve
        columns and pickling them took 132-149 us (more at a step's end, where it runs cold);
        the driver's unpack takes ~16 us."""
        return pickle.dumps(((rank, stage, step_key, start_s, end_s, num_tokens,
                              num_sampled_tokens, num_kv_rows_written),
                             self._coll.tobytes(), self._comp.tobytes()),
                            protocol=pickle.HIGHEST_PROTOCOL)


@dataclass(slots=True)
class CollectiveState:
    """Where a rank is in its step program, for diagnosing a collective that never
    completed. A *position* numbers the collectives of one rank's step program in order
    (TP peers run the same program, so a TP collective has the same position on all of
    them); pipeline transfers are keyed by ``(src, dst)`` instead."""

    rank: int
    step_key: object
    position: int
    """Position of the collective the rank is in, failed in, or will call next."""
    blocked: bool
    """True while inside, or after failing inside, the collective at ``position``."""
    done: bool
    """True once the step finished without error."""
    entered_tp: list[int]
    """Positions of the TP collectives the rank entered this step."""
    entered_pp: list[tuple[int, int]]
    """(src, dst) of the pipeline transfers the rank entered this step."""
    ops: dict[int, tuple[str, str, int]]
    """position -> (op, axis, layer) of every collective entered this step (for messages)."""
    error: str = ""
    """First line of the error the step raised, if any."""
