"""Convert public request traces to v1 :class:`Trace` objects.

- :func:`import_azure`: Azure LLM inference trace 2023 (Splitwise; CC-BY 4.0),
  ``TIMESTAMP,ContextTokens,GeneratedTokens``; arrivals are seconds after the first
  (earliest) row.
- :func:`import_vidur`: Vidur processed CSVs, ``arrived_at,num_prefill_tokens,
  num_decode_tokens``; length-only files (no ``arrived_at``) get arrivals from a chosen
  process (see :mod:`emulator.trace.synth`).
- :func:`import_mooncake`: Mooncake JSONL, ``timestamp`` (ms), ``input_length``,
  ``output_length``, ``hash_ids`` (one hash per 512-token block) -> ``prefix_block_hashes``.
- :func:`import_servegen`: ServeGen per-client distributions, sampled (in
  :mod:`emulator.trace.servegen`).

Files are parsed with pyarrow (no per-row Python). Every importer validates the rows in file
order, naming the file, the 0-based data row and its line (1-based; a CSV header is line 1)
and the column, then sorts stably by
arrival time; ``num_requests`` keeps the first N arrivals. Request ids are
``<format>-<file row, zero-padded>``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson

from emulator.errors import TraceError
from emulator.trace.schema import Trace
from emulator.trace.servegen import import_servegen
from emulator.trace.synth import sample_arrivals

__all__ = ["import_azure", "import_vidur", "import_mooncake", "import_servegen", "FORMATS"]

FORMATS = ("azure", "vidur", "mooncake", "servegen")
MOONCAKE_BLOCK_TOKENS = 512  # Mooncake traces hash prompts in 512-token blocks

# Regexes that a valid CSV cell must match; used only to find the first bad line after
# pyarrow's (row-less) conversion error.
_CELL_PATTERNS = {
    pa.int64(): r"^\s*[+-]?\d+\s*$",
    pa.float64(): r"^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$",
    pa.timestamp("ns"): r"^\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}(\.\d{1,9})?$",
}


def _where(row: int, first_line: int = 2) -> str:
    """A data row (0-based) and its file line (1-based; a CSV header is line 1)."""
    return f"row {row} (line {row + first_line})"


def _ids(prefix: str, n: int) -> np.ndarray:
    width = max(6, len(str(n - 1)))
    return np.array([f"{prefix}-{i:0{width}d}" for i in range(n)], dtype=object)


def _header(path: Path) -> list[str]:
    if not path.is_file():
        raise TraceError(f"{path}: no such file")
    with open(path, encoding="utf-8", errors="replace") as f:
        return [c.strip() for c in f.readline().strip().split(",")]


def _read_csv(path: Path, types: dict[str, pa.DataType]) -> dict[str, np.ndarray]:
    """Read ``types``' columns; on a bad or empty cell, name the file, line and column."""
    header = _header(path)
    missing = [c for c in types if c not in header]
    if missing:
        raise TraceError(f"{path.name}: line 1: missing column(s) {', '.join(missing)} "
                         f"(header has {', '.join(header)})")
    convert = pacsv.ConvertOptions(column_types=types, include_columns=list(types),
                                   timestamp_parsers=["%Y-%m-%d %H:%M:%S", pacsv.ISO8601])
    try:
        table = pacsv.read_csv(path, convert_options=convert)
    except pa.ArrowInvalid as exc:
        raise TraceError(_locate_bad_cell(path, types) or
                         f"{path.name}: {str(exc).splitlines()[0]}") from exc
    out = {}
    for name in types:
        col = table.column(name).combine_chunks()
        if col.null_count:
            row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
            raise TraceError(f"{path.name}: {_where(row)}, column {name}: empty value")
        out[name] = col.to_numpy(zero_copy_only=False)
    return out


def _locate_bad_cell(path: Path, types: dict[str, pa.DataType]) -> str | None:
    strings = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
        column_types={c: pa.string() for c in types}, include_columns=list(types)))
    for name, typ in types.items():
        col = strings.column(name)
        ok = pc.match_substring_regex(pc.fill_null(col, ""), _CELL_PATTERNS[typ])
        bad = np.flatnonzero(~ok.to_numpy(zero_copy_only=False))
        if bad.size:
            i = int(bad[0])
            return (f"{path.name}: {_where(i)}, column {name}: {col[i].as_py()!r} is not "
                    f"a valid {typ}")
    return None


def _int32(values: np.ndarray, path: Path, column: str) -> np.ndarray:
    bad = np.flatnonzero(np.abs(values) > np.iinfo(np.int32).max)
    if bad.size:
        raise TraceError(f"{path.name}: {_where(int(bad[0]))}, column {column}: "
                         f"{values[bad[0]]} is too large for a token count")
    return values.astype(np.int32)


def _finish(trace: Trace, path: Path, names: dict[str, str], num_requests: int | None,
            first_line: int = 2) -> Trace:
    """Validate in file order (line numbers), then sort stably and truncate."""
    trace.validate(path.name, row_label=lambda i: _where(i, first_line),
                   column_names=names, check_sorted=False)
    trace = trace.sorted_by_arrival()
    if num_requests is not None:
        if num_requests < 1:
            raise TraceError(f"num_requests must be >= 1, got {num_requests}")
        trace = trace.head(num_requests)
    return trace


def import_azure(csv_path: str | os.PathLike, *, num_requests: int | None = None) -> Trace:
    """Azure LLM inference trace CSV -> Trace (arrivals in seconds after the earliest
    TIMESTAMP, which is the first row of the sorted public files)."""
    path = Path(csv_path)
    cols = _read_csv(path, {"TIMESTAMP": pa.timestamp("ns"), "ContextTokens": pa.int64(),
                            "GeneratedTokens": pa.int64()})
    ts_ns = cols["TIMESTAMP"].astype("datetime64[ns]").astype(np.int64)
    # Integer nanoseconds before the float conversion keep all 7 fractional digits.
    arrival = (ts_ns - ts_ns.min()).astype(np.float64) / 1e9 if ts_ns.size else \
        ts_ns.astype(np.float64)
    n = arrival.shape[0]
    trace = Trace(_ids("azure", n), arrival, _int32(cols["ContextTokens"], path, "ContextTokens"),
                  _int32(cols["GeneratedTokens"], path, "GeneratedTokens"))
    names = {"arrival_time_s": "TIMESTAMP", "prompt_tokens": "ContextTokens",
             "output_tokens": "GeneratedTokens"}
    return _finish(trace, path, names, num_requests)


def import_vidur(csv_path: str | os.PathLike, *, arrival: str | None = None,
                 rate: float | None = None, cv: float | None = None, seed: int = 0,
                 num_requests: int | None = None) -> Trace:
    """Vidur processed CSV -> Trace.

    With an ``arrived_at`` column (seconds) its arrivals are used and ``arrival`` must be
    None. Length-only files need ``arrival`` ("batch", "poisson" with ``rate``, or "gamma"
    with ``rate`` and ``cv``), sampled with ``seed``.
    """
    path = Path(csv_path)
    header = _header(path)
    types = {"num_prefill_tokens": pa.int64(), "num_decode_tokens": pa.int64()}
    timed = "arrived_at" in header
    if timed:
        if arrival is not None:
            raise TraceError(f"{path.name} has an arrived_at column; drop the arrival process "
                             f"(--arrival) or use a length-only file")
        types = {"arrived_at": pa.float64(), **types}
    elif arrival is None:
        raise TraceError(f"{path.name} has no arrived_at column; choose an arrival process "
                         f"(--arrival batch|poisson|gamma)")
    cols = _read_csv(path, types)
    if timed:
        times = cols["arrived_at"].astype(np.float64)
    else:
        if num_requests is not None:  # the first N rows get the N sampled arrivals
            cols = {k: v[:max(num_requests, 0)] for k, v in cols.items()}
        times = sample_arrivals(arrival, cols["num_prefill_tokens"].shape[0],
                                np.random.default_rng(seed), rate=rate, cv=cv)
    n = times.shape[0]
    trace = Trace(_ids("vidur", n), times,
                  _int32(cols["num_prefill_tokens"], path, "num_prefill_tokens"),
                  _int32(cols["num_decode_tokens"], path, "num_decode_tokens"))
    names = {"arrival_time_s": "arrived_at", "prompt_tokens": "num_prefill_tokens",
             "output_tokens": "num_decode_tokens"}
    return _finish(trace, path, names, num_requests)


def import_mooncake(jsonl_path: str | os.PathLike, *, num_requests: int | None = None,
                    block_size_tokens: int = MOONCAKE_BLOCK_TOKENS) -> Trace:
    """Mooncake JSONL -> Trace (arrivals in seconds after the earliest ``timestamp``, which
    is in milliseconds; ``hash_ids`` -> ``prefix_block_hashes`` when present)."""
    path = Path(jsonl_path)
    if not path.is_file():
        raise TraceError(f"{path}: no such file")
    try:
        table = pajson.read_json(path)
    except pa.ArrowInvalid as exc:
        msg = str(exc).splitlines()[0]
        m = re.search(r"[Rr]ow #?(\d+)", msg)
        where = f"{_where(int(m.group(1)), 1)}: " if m else ""
        raise TraceError(f"{path.name}: {where}invalid JSON: {msg}") from exc
    required = ("timestamp", "input_length", "output_length")
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise TraceError(f"{path.name}: missing field(s) {', '.join(missing)} "
                         f"(found {', '.join(table.column_names)})")
    cols = {}
    for name in required + (("hash_ids",) if "hash_ids" in table.column_names else ()):
        col = table.column(name).combine_chunks()
        if col.null_count:
            row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
            raise TraceError(f"{path.name}: {_where(row, 1)}, field {name}: missing value")
        want = pa.types.is_list if name == "hash_ids" else \
            (lambda t: pa.types.is_integer(t) or pa.types.is_floating(t))
        if not want(col.type):
            raise TraceError(f"{path.name}: field {name} has type {col.type}, expected "
                             f"{'a list of integers' if name == 'hash_ids' else 'a number'}")
        cols[name] = col
    ts_ms = cols["timestamp"].to_numpy(zero_copy_only=False).astype(np.float64)
    arrival = (ts_ms - ts_ms.min()) / 1e3 if ts_ms.size else ts_ms
    hashes = None
    if "hash_ids" in cols:
        lists = cols["hash_ids"]
        offsets = lists.offsets.to_numpy()
        values = lists.values.to_numpy(zero_copy_only=False).astype(np.int64)
        hashes = np.split(values, offsets[1:-1] - offsets[0]) if len(lists) else []
    n = arrival.shape[0]
    trace = Trace(_ids("mooncake", n), arrival,
                  _json_int32(cols["input_length"], path, "input_length"),
                  _json_int32(cols["output_length"], path, "output_length"),
                  prefix_block_hashes=hashes,
                  prefix_block_size_tokens=block_size_tokens if hashes is not None else None)
    names = {"arrival_time_s": "timestamp", "prompt_tokens": "input_length",
             "output_tokens": "output_length",
             "prefix_block_hashes": "hash_ids"}
    return _finish(trace, path, names, num_requests, first_line=1)


def _json_int32(col: pa.Array, path: Path, field: str) -> np.ndarray:
    values = col.to_numpy(zero_copy_only=False)
    bad = np.flatnonzero((values != np.rint(values)) | (np.abs(values) > np.iinfo(np.int32).max))
    if bad.size:
        raise TraceError(f"{path.name}: {_where(int(bad[0]), 1)}, field {field}: "
                         f"{values[bad[0]]} is not a token count")
    return values.astype(np.int32)
