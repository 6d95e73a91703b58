"""Request-trace schema v1: the Arrow schema, the in-memory :class:`Trace`, and validation.

Pure: no file I/O, no clock, no ray/torch. Reading and writing files is in
:mod:`emulator.trace.io`; converting public traces is in :mod:`emulator.trace.importers`.

Columns (units in the names; DESIGN.md section 6):

=====================  ==============  ========  =============================================
column                 Arrow type      required  meaning
=====================  ==============  ========  =============================================
request_id             string          yes       unique id of the request
arrival_time_s         float64         yes       arrival time, seconds from the trace start
prompt_tokens          int32           yes       input length, >= 1
output_tokens          int32           yes       generated length incl. reasoning, >= 1
reasoning_tokens       int32           no        part of output_tokens spent reasoning, 0..output
prefix_block_hashes    list<int64>     no        hashes of the prompt's KV blocks (prefix reuse)
session_id             string          no        conversation/session; may be null
priority               int16           no        scheduling priority (lower = sooner)
=====================  ==============  ========  =============================================

Schema metadata: ``emulator.schema_version`` = ``"1"``, ``emulator.units`` (JSON column -> unit)
and, when prefix hashes are present and the block size is known,
``emulator.prefix_block_size_tokens``. A file with no version key is read as version 1; any
other version is rejected.

Validation rules (checked vectorised; rows are 0-based):

- every known column has its expected type; integer columns of another width are accepted
  when every value fits; unknown columns are rejected (they are usually typos);
- no nulls, except in ``session_id``;
- ``prompt_tokens`` and ``output_tokens`` >= 1; ``0 <= reasoning_tokens <= output_tokens``;
- ``arrival_time_s`` finite and >= 0, and **non-decreasing**: an unsorted file is rejected,
  naming the first row that arrives before its predecessor. Readers never reorder rows;
  importers and generators sort stably by arrival time before they build a :class:`Trace`.
- ``request_id`` values are unique.

A failed check raises :class:`emulator.errors.TraceError` with one line that starts with the
source (usually the file name) and lists the first few bad rows with their column and reason.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from emulator.errors import TraceError

SCHEMA_VERSION = "1"
META_VERSION = b"emulator.schema_version"
META_UNITS = b"emulator.units"
META_BLOCK_SIZE = b"emulator.prefix_block_size_tokens"

REQUIRED_COLUMNS: dict[str, pa.DataType] = {
    "request_id": pa.string(),
    "arrival_time_s": pa.float64(),
    "prompt_tokens": pa.int32(),
    "output_tokens": pa.int32(),
}
OPTIONAL_COLUMNS: dict[str, pa.DataType] = {
    "reasoning_tokens": pa.int32(),
    "prefix_block_hashes": pa.list_(pa.int64()),
    "session_id": pa.string(),
    "priority": pa.int16(),
}
ALL_COLUMNS = {**REQUIRED_COLUMNS, **OPTIONAL_COLUMNS}
UNITS = {
    "arrival_time_s": "s",
    "prompt_tokens": "tokens",
    "output_tokens": "tokens",
    "reasoning_tokens": "tokens",
    "prefix_block_hashes": "hash per KV block",
}
# How many bad rows one error message lists before summarising the rest.
MAX_REPORTED_ROWS = 5

RowLabel = Callable[[int], str]


def _row(i: int) -> str:
    return f"row {i}"


def arrow_schema(columns: list[str], *, prefix_block_size_tokens: int | None = None) -> pa.Schema:
    """The v1 Arrow schema for the given columns (in canonical order) with its metadata."""
    fields = [pa.field(n, t, nullable=(n == "session_id")) for n, t in ALL_COLUMNS.items()
              if n in columns]
    meta = {META_VERSION: SCHEMA_VERSION.encode(),
            META_UNITS: json.dumps({n: u for n, u in UNITS.items() if n in columns}).encode()}
    if prefix_block_size_tokens is not None:
        meta[META_BLOCK_SIZE] = str(prefix_block_size_tokens).encode()
    return pa.schema(fields, metadata=meta)


@dataclass(slots=True)
class Trace:
    """A request trace as numpy columns (one entry per request, sorted by arrival time).

    Build with :func:`Trace.from_arrow`, an importer or a generator; those validate. A Trace
    built by hand is checked by :meth:`validate`.
    """

    request_id: np.ndarray  # object array of str, [N]
    arrival_time_s: np.ndarray  # float64 [N], seconds from trace start, non-decreasing
    prompt_tokens: np.ndarray  # int32 [N], >= 1
    output_tokens: np.ndarray  # int32 [N], >= 1, includes reasoning tokens
    reasoning_tokens: np.ndarray | None = None  # int32 [N], 0..output_tokens
    prefix_block_hashes: list[np.ndarray] | None = None  # N int64 arrays (one per request)
    session_id: np.ndarray | None = None  # object array of str or None, [N]
    priority: np.ndarray | None = None  # int16 [N]
    prefix_block_size_tokens: int | None = None  # tokens per hashed block, if known

    def __len__(self) -> int:
        return int(self.arrival_time_s.shape[0])

    @property
    def columns(self) -> list[str]:
        return [n for n in ALL_COLUMNS if getattr(self, n) is not None]

    def slice(self, start: int, stop: int) -> Trace:
        """Rows ``start:stop`` (numpy views; the list column is a shallow copy)."""
        def cut(x):
            return None if x is None else x[start:stop]
        return Trace(self.request_id[start:stop], self.arrival_time_s[start:stop],
                     self.prompt_tokens[start:stop], self.output_tokens[start:stop],
                     cut(self.reasoning_tokens), cut(self.prefix_block_hashes),
                     cut(self.session_id), cut(self.priority), self.prefix_block_size_tokens)

    def head(self, n: int) -> Trace:
        return self.slice(0, n)

    def take(self, indices: np.ndarray) -> Trace:
        """Rows in the order of ``indices`` (used to sort)."""
        def pick(x):
            return None if x is None else x[indices]
        hashes = None if self.prefix_block_hashes is None else \
            [self.prefix_block_hashes[i] for i in indices]
        return Trace(self.request_id[indices], self.arrival_time_s[indices],
                     self.prompt_tokens[indices], self.output_tokens[indices],
                     pick(self.reasoning_tokens), hashes, pick(self.session_id),
                     pick(self.priority), self.prefix_block_size_tokens)

    def sorted_by_arrival(self) -> Trace:
        """A stable sort by arrival time (ties keep their input order)."""
        order = np.argsort(self.arrival_time_s, kind="stable")
        if np.all(order == np.arange(len(self))):
            return self
        return self.take(order)

    def validate(self, source: str = "<trace>", *, row_label: RowLabel = _row,
                 column_names: dict[str, str] | None = None, check_sorted: bool = True,
                 prev_arrival_s: float | None = None) -> Trace:
        """Raise TraceError naming ``source`` and the first bad rows; return self if valid.

        ``row_label`` turns a 0-based index into text (importers pass CSV line numbers),
        ``column_names`` maps schema columns to the names in the source file, and
        ``prev_arrival_s`` is the last arrival of the previous batch when streaming.
        """
        problems, num_bad = _find_problems(self, check_sorted, prev_arrival_s, row_label)
        if problems:
            names = column_names or {}
            problems = [(i, names.get(c, c), why) for i, c, why in problems]
            raise TraceError(_format_problems(source, problems, num_bad, row_label))
        return self

    def to_arrow(self) -> pa.Table:
        arrays = [pa.array(self.request_id, type=pa.string()),
                  pa.array(self.arrival_time_s, type=pa.float64()),
                  pa.array(self.prompt_tokens, type=pa.int32()),
                  pa.array(self.output_tokens, type=pa.int32())]
        if self.reasoning_tokens is not None:
            arrays.append(pa.array(self.reasoning_tokens, type=pa.int32()))
        if self.prefix_block_hashes is not None:
            arrays.append(_hashes_to_arrow(self.prefix_block_hashes))
        if self.session_id is not None:
            arrays.append(pa.array(self.session_id, type=pa.string()))
        if self.priority is not None:
            arrays.append(pa.array(self.priority, type=pa.int16()))
        schema = arrow_schema(self.columns, prefix_block_size_tokens=self.prefix_block_size_tokens
                              if self.prefix_block_hashes is not None else None)
        return pa.Table.from_arrays(arrays, schema=schema)

    @classmethod
    def from_arrow(cls, table: pa.Table | pa.RecordBatch, *, source: str = "<arrow>",
                   row_offset: int = 0, check_sorted: bool = True,
                   prev_arrival_s: float | None = None) -> Trace:
        """Check the schema, convert to numpy and validate every row.

        ``row_offset`` is added to row numbers in messages (for streamed batches).
        """
        check_schema(table.schema, source)
        cols = {name: _column_to_numpy(table, name, source, row_offset)
                for name in table.schema.names}
        block = table.schema.metadata.get(META_BLOCK_SIZE) if table.schema.metadata else None
        trace = cls(**cols, prefix_block_size_tokens=int(block) if block else None)
        return trace.validate(source, row_label=lambda i: f"row {i + row_offset}",
                              check_sorted=check_sorted, prev_arrival_s=prev_arrival_s)


def check_schema(schema: pa.Schema, source: str) -> None:
    """Column names, types and the schema version, before any row is read."""
    meta = schema.metadata or {}
    version = meta.get(META_VERSION, SCHEMA_VERSION.encode()).decode()
    if version != SCHEMA_VERSION:
        raise TraceError(f"{source}: trace schema version {version!r} is not supported (this "
                         f"emulator reads version {SCHEMA_VERSION}); re-import or convert it")
    names = schema.names
    unknown = [n for n in names if n not in ALL_COLUMNS]
    if unknown:
        raise TraceError(f"{source}: unknown column(s) {', '.join(unknown)}; a v1 trace has "
                         f"{', '.join(ALL_COLUMNS)}")
    missing = [n for n in REQUIRED_COLUMNS if n not in names]
    if missing:
        raise TraceError(f"{source}: missing required column(s) {', '.join(missing)} "
                         f"(found {', '.join(names) or 'none'})")
    for name in names:
        got, want = schema.field(name).type, ALL_COLUMNS[name]
        if not _type_ok(got, want):
            raise TraceError(f"{source}: column {name} has type {got}, expected {want}")


def _type_ok(got: pa.DataType, want: pa.DataType) -> bool:
    if pa.types.is_string(want):
        return pa.types.is_string(got) or pa.types.is_large_string(got)
    if pa.types.is_integer(want):
        return pa.types.is_integer(got)
    if pa.types.is_floating(want):
        return pa.types.is_floating(got)
    return (pa.types.is_list(got) or pa.types.is_large_list(got)) and \
        pa.types.is_integer(got.value_type)


def _column_to_numpy(table, name: str, source: str, row_offset: int):
    col = table.column(name)
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if name != "session_id" and col.null_count:
        first = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise TraceError(f"{source}: row {first + row_offset}, column {name}: value is null "
                         f"(only session_id may be null)")
    want = ALL_COLUMNS[name]
    if name == "prefix_block_hashes":
        # .values ignores a slice's offset; cut the child array to this slice's range.
        offsets = col.offsets.to_numpy()
        values = col.values.to_numpy(zero_copy_only=False)[offsets[0]:offsets[-1]]
        values = values.astype(np.int64, copy=False)
        return np.split(values, offsets[1:-1] - offsets[0]) if len(col) else []
    if pa.types.is_string(want):
        return col.to_numpy(zero_copy_only=False).astype(object, copy=False)
    values = col.to_numpy(zero_copy_only=False)
    if pa.types.is_integer(want):
        dtype = np.dtype(want.to_pandas_dtype())
        info = np.iinfo(dtype)
        bad = np.flatnonzero((values < info.min) | (values > info.max))
        if bad.size:
            raise TraceError(f"{source}: row {int(bad[0]) + row_offset}, column {name}: "
                             f"{values[bad[0]]} does not fit {want}")
        return values.astype(dtype, copy=False)
    return values.astype(np.float64, copy=False)


def _hashes_to_arrow(hashes: list[np.ndarray]) -> pa.Array:
    lengths = np.fromiter((len(h) for h in hashes), dtype=np.int64, count=len(hashes))
    offsets = np.zeros(len(hashes) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate(hashes).astype(np.int64) if hashes else np.zeros(0, np.int64)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=pa.int64()))


def _find_problems(t: Trace, check_sorted: bool, prev_arrival_s: float | None,
                   label_dup: RowLabel) -> tuple[list[tuple[int, str, str]], int]:
    """The first (row, column, reason) problems of each check and the total count of bad
    values; each check is vectorised over the whole column."""
    n = len(t)
    problems: list[tuple[int, str, str]] = []
    num_bad = 0

    def add(mask: np.ndarray, column: str, reason: Callable[[int], str]) -> None:
        nonlocal num_bad
        bad = np.flatnonzero(mask)
        num_bad += int(bad.size)
        problems.extend((int(i), column, reason(int(i))) for i in bad[:MAX_REPORTED_ROWS])

    for name in ("request_id", "prompt_tokens", "output_tokens", "reasoning_tokens",
                 "session_id", "priority"):
        col = getattr(t, name)
        if col is not None and col.shape[0] != n:
            raise TraceError(f"column {name} has {col.shape[0]} rows but arrival_time_s has {n}")
    if t.prefix_block_hashes is not None and len(t.prefix_block_hashes) != n:
        raise TraceError(f"column prefix_block_hashes has {len(t.prefix_block_hashes)} rows "
                         f"but arrival_time_s has {n}")

    arr = t.arrival_time_s
    add(~np.isfinite(arr), "arrival_time_s", lambda i: f"{arr[i]} is not a finite time")
    add(arr < 0, "arrival_time_s", lambda i: f"{arr[i]} is negative")
    if check_sorted and n:
        prev = np.concatenate(([-np.inf if prev_arrival_s is None else prev_arrival_s], arr[:-1]))
        # A row after an infinite one is not reported again: the inf is the problem.
        add((arr < prev) & (prev != np.inf), "arrival_time_s",
            lambda i: f"{arr[i]} arrives before the previous row ({prev[i]}); sort by arrival")
    for name in ("prompt_tokens", "output_tokens"):
        col = getattr(t, name)
        add(col < 1, name, lambda i, c=col: f"{c[i]} is not a positive token count")
    if t.reasoning_tokens is not None:
        r, o = t.reasoning_tokens, t.output_tokens
        add(r < 0, "reasoning_tokens", lambda i: f"{r[i]} is negative")
        add(r > o, "reasoning_tokens",
            lambda i: f"{r[i]} exceeds output_tokens {o[i]} (reasoning is part of the output)")
    if n:
        codes = pa.array(t.request_id, type=pa.string()).dictionary_encode().indices.to_numpy()
        _, first = np.unique(codes, return_index=True)
        ids = t.request_id
        add(first[codes] != np.arange(n), "request_id",
            lambda i: f"{ids[i]!r} repeats {label_dup(int(first[codes[i]]))}")
    return problems, num_bad


def _format_problems(source: str, problems: list[tuple[int, str, str]], num_bad: int,
                     label: RowLabel) -> str:
    shown = sorted(problems)[:MAX_REPORTED_ROWS]
    parts = [f"{label(i)}, column {col}: {why}" for i, col, why in shown]
    more = num_bad - len(shown)
    tail = f"; and {more} more bad value(s)" if more > 0 else ""
    return f"{source}: " + "; ".join(parts) + tail
