"""Columnar record buffers for the run tables, cheap to append to on the hot path.

- :class:`StepRecords`: one row per (replica, step, stage). ``append`` stores a tuple (one
  list append per row, ~0.3 µs); ``extend`` takes whole numpy columns for fast-forwarded
  runs of many steps. Rows become numpy chunks lazily, and an Arrow table at the end.
- :class:`CollectiveRecords`: one row per (rank, collective op). Ranks ship their rows as
  numpy columns; ``finalize`` joins the ranks of each collective *instance* to compute
  ``sync_wait_s`` and ``transfer_s`` (see :func:`compute_sync_transfer` for the keying).
- :class:`RequestRecords`: the per-request table, built once from arrays, vectorized.

Schemas, units and the schema version live in :mod:`emulator.metrics.schema`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from emulator.metrics.instances import compute_sync_transfer
from emulator.metrics.schema import (
    AXES,
    COLLECTIVE_COLUMNS,
    COLLECTIVES_SCHEMA,
    OPS,
    REQUEST_COLUMNS,
    REQUESTS_SCHEMA,
    STEP_COLUMNS,
    STEPS_SCHEMA,
    Column,
)

__all__ = ["StepRecords", "CollectiveRecords", "RequestRecords", "compute_sync_transfer"]


def _as_column(name: str, value: Any, dtype: np.dtype | None, n: int) -> np.ndarray:
    """Convert one input column (array-like or scalar, broadcast to ``n``) to its dtype.

    Casting is ``same_kind`` so a float handed to an integer column is an error, not a
    silent truncation.
    """
    arr = np.asarray(value, dtype=object if dtype is None else None)
    if arr.ndim == 0:
        arr = np.full(n, arr.item(), dtype=arr.dtype if dtype is None else None)
    if arr.ndim != 1 or len(arr) != n:
        raise ValueError(f"column {name!r} has shape {arr.shape}; expected ({n},) like the others")
    if dtype is None:
        return arr.astype(object, copy=False)
    try:
        return arr.astype(dtype, casting="same_kind", copy=False)
    except TypeError as exc:
        raise ValueError(
            f"column {name!r} of dtype {arr.dtype} cannot hold {dtype}: {exc}") from exc


def _columns_from_mapping(columns: Mapping[str, Any], spec: tuple[Column, ...],
                          defaults: Mapping[str, Any]) -> dict[str, np.ndarray]:
    names = {c[0] for c in spec}
    unknown = set(columns) - names
    if unknown:
        raise ValueError(f"unknown columns {sorted(unknown)}; expected {sorted(names)}")
    missing = names - set(columns) - set(defaults)
    if missing:
        raise ValueError(f"missing columns {sorted(missing)}")
    lengths = {len(v) for v in columns.values() if np.ndim(v) == 1}
    if len(lengths) > 1:
        raise ValueError(f"columns differ in length: {sorted(lengths)}")
    if not lengths:
        raise ValueError("at least one column must be a 1-D array (scalars are broadcast)")
    n = lengths.pop()
    merged = {**defaults, **columns}
    return {name: _as_column(name, merged[name], dtype, n)
            for name, _, dtype, _ in spec if name in merged}


def _concat(chunks: list[dict[str, np.ndarray]], spec: tuple[Column, ...],
            names: tuple[str, ...]) -> dict[str, np.ndarray]:
    out = {}
    for name, _, dtype, _ in spec:
        if name not in names:
            continue
        parts = [c[name] for c in chunks]
        out[name] = np.concatenate(parts) if parts else np.empty(0, dtype=dtype or object)
    return out


def _table(cols: Mapping[str, np.ndarray], schema: pa.Schema) -> pa.Table:
    arrays = [pa.array(cols[f.name], type=f.type) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


class StepRecords:
    """Per-step (per stage) rows of one run. Columns: ``STEPS_SCHEMA``."""

    __slots__ = ("_rows", "_chunks")
    _NAMES = tuple(c[0] for c in STEP_COLUMNS)

    def __init__(self) -> None:
        self._rows: list[tuple] = []
        self._chunks: list[dict[str, np.ndarray]] = []

    def append(self, replica: int, step: int, stage: int, start_s: float, end_s: float,
               num_requests: int, num_prefill_tokens: int, num_decode_tokens: int,
               compute_s: float, comm_s: float, kv_blocks_used: int, kv_blocks_total: int,
               micro_batch: int = 0) -> None:
        # One tuple per row: far cheaper than 13 numpy item writes on the simulator's hot path.
        self._rows.append((replica, step, stage, start_s, end_s, num_requests,
                           num_prefill_tokens, num_decode_tokens, compute_s, comm_s,
                           kv_blocks_used, kv_blocks_total, micro_batch))

    def extend(self, **columns: Any) -> None:
        """Append many rows at once: one numpy array (or a scalar, broadcast) per column;
        ``micro_batch`` defaults to 0."""
        self._flush_rows()
        self._chunks.append(_columns_from_mapping(columns, STEP_COLUMNS, {"micro_batch": 0}))

    def _flush_rows(self) -> None:
        if not self._rows:
            return
        chunk = {name: np.array(col, dtype=dtype)
                 for (name, _, dtype, _), col in zip(STEP_COLUMNS, zip(*self._rows))}
        self._chunks.append(chunk)
        self._rows = []

    def __len__(self) -> int:
        return len(self._rows) + sum(len(c["step"]) for c in self._chunks)

    def to_table(self) -> pa.Table:
        self._flush_rows()
        return _table(_concat(self._chunks, STEP_COLUMNS, self._NAMES), STEPS_SCHEMA)


# What the runtime supplies: every collective column but the two computed by finalize().
_COLLECTIVE_INPUT_SPEC = tuple(c for c in COLLECTIVE_COLUMNS
                               if c[0] not in ("sync_wait_s", "transfer_s"))


class CollectiveRecords:
    """Per-rank collective rows of one run. Columns: ``COLLECTIVES_SCHEMA``.

    The runtime supplies every column but ``sync_wait_s`` and ``transfer_s`` (computed by
    :meth:`finalize`); ``micro_batch`` defaults to 0. Times must already be on the common
    clock (per-node offsets applied) and divided by ``dilation``.
    """

    __slots__ = ("_chunks",)
    _INPUT = tuple(c[0] for c in _COLLECTIVE_INPUT_SPEC)
    _INPUT_SPEC = _COLLECTIVE_INPUT_SPEC

    def __init__(self) -> None:
        self._chunks: list[dict[str, np.ndarray]] = []

    def extend(self, columns: Mapping[str, Any]) -> None:
        chunk = _columns_from_mapping(columns, self._INPUT_SPEC, {"micro_batch": 0})
        for name, allowed in (("axis", AXES), ("op", OPS)):
            bad = set(chunk[name].tolist()) - set(allowed)
            if bad:
                raise ValueError(f"column {name!r} has values {sorted(map(str, bad))}; "
                                 f"allowed: {', '.join(allowed)}")
        self._chunks.append(chunk)

    def __len__(self) -> int:
        return sum(len(c["rank"]) for c in self._chunks)

    def finalize(self) -> pa.Table:
        """Join the ranks of each collective instance; return the table with
        ``sync_wait_s`` and ``transfer_s`` filled."""
        cols = _concat(self._chunks, self._INPUT_SPEC, self._INPUT)
        sync_wait_s, transfer_s = compute_sync_transfer(
            replica=cols["replica"], step=cols["step"], group=cols["group"], seq=cols["seq"],
            op=cols["op"], layer=cols["layer"], entry_s=cols["entry_s"], exit_s=cols["exit_s"])
        cols["sync_wait_s"] = sync_wait_s
        cols["transfer_s"] = transfer_s
        return _table(cols, COLLECTIVES_SCHEMA)

    def to_table(self) -> pa.Table:
        return self.finalize()


class RequestRecords:
    """The per-request table. Columns: ``REQUESTS_SCHEMA``. Build with :meth:`from_arrays`."""

    __slots__ = ("_table",)

    def __init__(self, table: pa.Table) -> None:
        if not table.schema.equals(REQUESTS_SCHEMA):
            raise ValueError("RequestRecords needs a table with REQUESTS_SCHEMA; use from_arrays")
        self._table = table

    @classmethod
    def from_arrays(cls, *, request_id: Any, replica: Any, arrival_s: Any, first_token_s: Any,
                    finish_s: Any, prompt_tokens: Any, output_tokens: Any,
                    num_preemptions: Any) -> RequestRecords:
        """Derive ttft/tpot/e2e from the event times. Unfinished requests carry NaN in
        ``finish_s`` (and ``first_token_s`` if no token came out); their derived latencies
        are NaN too. ``tpot_s = (finish - first_token) / (output_tokens - 1)`` for
        ``output_tokens > 1``, else NaN (one token has no inter-token time)."""
        given = dict(request_id=request_id, replica=replica, arrival_s=arrival_s,
                     first_token_s=first_token_s, finish_s=finish_s,
                     prompt_tokens=prompt_tokens, output_tokens=output_tokens,
                     num_preemptions=num_preemptions)
        spec = tuple(c for c in REQUEST_COLUMNS if c[0] in given)
        cols = _columns_from_mapping(given, spec, {})
        arrival, first, finish = cols["arrival_s"], cols["first_token_s"], cols["finish_s"]
        out_tokens = cols["output_tokens"].astype(np.float64)
        cols["ttft_s"] = first - arrival
        cols["e2e_s"] = finish - arrival
        with np.errstate(divide="ignore", invalid="ignore"):
            tpot = (finish - first) / (out_tokens - 1.0)
        cols["tpot_s"] = np.where(out_tokens > 1, tpot, np.nan)
        cols["request_id"] = cols["request_id"].astype(str).astype(object)
        return cls(_table(cols, REQUESTS_SCHEMA))

    def __len__(self) -> int:
        return self._table.num_rows

    def to_table(self) -> pa.Table:
        return self._table
