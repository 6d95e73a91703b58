"""Read and write v1 traces: Arrow IPC (``.arrow``, file or stream format) or Parquet
(``.parquet``), chosen by suffix.

Reading always validates (see :mod:`emulator.trace.schema`): the whole file for
:func:`read_trace`, batch by batch with global row numbers for :func:`iter_trace_batches`.
Writing validates first and is atomic, so a failed write leaves no file behind.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from emulator.atomic import atomic_path
from emulator.errors import TraceError
from emulator.trace.schema import Trace, check_schema

ARROW_SUFFIXES = (".arrow", ".ipc", ".feather")
PARQUET_SUFFIXES = (".parquet", ".pq")


def _kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in ARROW_SUFFIXES:
        return "arrow"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    raise TraceError(f"{path}: unknown trace file suffix {suffix!r}; use .arrow (Arrow IPC) "
                     f"or .parquet")


def _batches(path: Path) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    """The file's schema and an iterator over its record batches (nothing is read twice)."""
    if not path.is_file():
        raise TraceError(f"{path}: no such trace file")
    kind = _kind(path)
    try:
        if kind == "parquet":
            pf = pq.ParquetFile(path)
            schema = pf.schema_arrow
            return schema, _guarded(pf.iter_batches(batch_size=65536), path)
        source = pa.memory_map(str(path))
        try:
            reader = ipc.open_file(source)
            return reader.schema, _guarded(
                (reader.get_batch(i) for i in range(reader.num_record_batches)), path)
        except pa.ArrowInvalid:  # not the file format: try the stream format
            source = pa.memory_map(str(path))
            reader = ipc.open_stream(source)
            return reader.schema, _guarded(iter(reader), path)
    except (pa.ArrowException, OSError) as exc:
        raise TraceError(f"{path.name}: cannot read as {kind}: {exc}".splitlines()[0]) from exc


def _guarded(batches: Iterator[pa.RecordBatch], path: Path) -> Iterator[pa.RecordBatch]:
    try:
        yield from batches
    except (pa.ArrowException, OSError) as exc:
        raise TraceError(f"{path.name}: corrupt data: {exc}".splitlines()[0]) from exc


def read_trace(path: str | os.PathLike) -> Trace:
    """Read and validate a whole trace file."""
    path = Path(path)
    schema, batches = _batches(path)
    check_schema(schema, path.name)
    table = pa.Table.from_batches(list(batches), schema=schema)
    return Trace.from_arrow(table, source=path.name)


def iter_trace_batches(path: str | os.PathLike, batch_rows: int = 65536) -> Iterator[Trace]:
    """Yield the trace in pieces of at most ``batch_rows`` rows, each validated.

    Row numbers in errors are global; arrival order and request-id uniqueness are checked
    across batch boundaries too (the ids seen so far are kept in a set).
    """
    if batch_rows < 1:
        raise TraceError(f"batch_rows must be >= 1, got {batch_rows}")
    path = Path(path)
    schema, batches = _batches(path)
    check_schema(schema, path.name)
    offset = 0
    prev_arrival: float | None = None
    seen: set[str] = set()
    for batch in batches:
        for start in range(0, batch.num_rows, batch_rows):
            piece = batch.slice(start, batch_rows)
            trace = Trace.from_arrow(piece, source=path.name, row_offset=offset,
                                     prev_arrival_s=prev_arrival)
            _check_ids_unseen(trace, seen, offset, path.name)
            if len(trace):
                prev_arrival = float(trace.arrival_time_s[-1])
            offset += len(trace)
            yield trace


def _check_ids_unseen(trace: Trace, seen: set[str], offset: int, source: str) -> None:
    ids = trace.request_id.tolist()
    if not seen.isdisjoint(ids):
        first = next(i for i, rid in enumerate(ids) if rid in seen)
        raise TraceError(f"{source}: row {first + offset}, column request_id: {ids[first]!r} "
                         f"repeats an earlier row")
    seen.update(ids)


def write_trace(trace: Trace, path: str | os.PathLike) -> Path:
    """Validate ``trace`` and write it atomically (format by suffix); returns the path."""
    path = Path(path)
    kind = _kind(path)
    trace.validate(f"{path.name} (writing)")
    table = trace.to_arrow()
    with atomic_path(path) as tmp:
        if kind == "parquet":
            pq.write_table(table, tmp)
        else:
            with ipc.new_file(str(tmp), table.schema) as writer:
                writer.write_table(table, max_chunksize=65536)
    return path


def describe(trace: Trace) -> dict[str, float | int | None]:
    """Summary figures for ``emulator trace inspect`` (and tests): counts, span, rate and
    length statistics (mean, p50, p90, p99, max) per token column present."""
    n = len(trace)
    out: dict[str, float | int | None] = {"num_requests": n}
    span = float(trace.arrival_time_s[-1] - trace.arrival_time_s[0]) if n else 0.0
    out["span_s"] = span
    out["mean_rate_per_s"] = n / span if span > 0 else None
    cols = {"prompt_tokens": trace.prompt_tokens, "output_tokens": trace.output_tokens,
            "reasoning_tokens": trace.reasoning_tokens}
    for name, col in cols.items():
        if col is None or n == 0:
            continue
        p50, p90, p99 = np.percentile(col, [50, 90, 99])
        out.update({f"{name}.mean": float(col.mean()), f"{name}.p50": float(p50),
                    f"{name}.p90": float(p90), f"{name}.p99": float(p99),
                    f"{name}.max": int(col.max())})
    return out
