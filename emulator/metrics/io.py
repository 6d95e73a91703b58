"""Run output I/O, in one place: the output directory, written atomically, and read back.

A run directory holds ``requests.parquet``, ``steps.parquet``, ``collectives.parquet``
(only when collectives were recorded), ``timeline.json`` (Chrome trace events of the first
steps, size-capped: :mod:`emulator.metrics.timeline`) and ``summary.json`` (DESIGN section
7). Every file is written under a temporary name and renamed on success (:mod:`emulator.atomic`), and
``summary.json`` is removed first and written last, so a directory that has a
``summary.json`` holds the tables that belong to it.

Crash safety — the intended use in a driver::

    writer = RunWriter(outdir)          # checks the path; writes nothing yet
    try:
        ... run, appending to StepRecords / CollectiveRecords ...
    except BaseException as exc:
        writer.flush_partial(requests=..., steps=..., collectives=..., mode=..., config=...,
                             error=exc)   # finished work, summary with complete=false
        raise
    writer.finish(requests=..., steps=..., collectives=..., mode=..., config=...)
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from emulator.atomic import atomic_path, write_json_atomic, write_text_atomic
from emulator.errors import UserError
from emulator.metrics.schema import SCHEMA_VERSION, SCHEMAS, TABLE_KEY, VERSION_KEY
from emulator.metrics.summary import build_summary, compute_metrics
from emulator.metrics.timeline import DEFAULT_MAX_STEPS, TIMELINE_FILE, write_timeline

__all__ = ["OutputError", "Run", "RunWriter", "read_run", "write_table_atomic",
           "atomic_path", "write_json_atomic", "write_text_atomic"]

FILES = {"requests": "requests.parquet", "steps": "steps.parquet",
         "collectives": "collectives.parquet", "moe": "moe.parquet"}
OPTIONAL = ("collectives", "moe")
"""Tables written only when they have rows (moe: per-MoE-layer EP metrics, metrics.moe)."""
SUMMARY_FILE = "summary.json"


class OutputError(UserError, ValueError):
    """An output directory cannot be written or read; the message names the path."""


class _HasTable(Protocol):
    def to_table(self) -> pa.Table: ...


TableLike = pa.Table | _HasTable


def write_table_atomic(path: str | Path, table: pa.Table) -> None:
    """Write ``table`` as Parquet at ``path``; nothing appears at ``path`` if writing fails."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _as_table(value: TableLike, name: str) -> pa.Table:
    table = value if isinstance(value, pa.Table) else value.to_table()
    missing = [c for c in SCHEMAS[name].names if c not in table.column_names]
    if missing:
        raise ValueError(f"{name} table lacks contract columns {missing}")
    return table


@dataclass(frozen=True, slots=True)
class Run:
    """A run directory read back: its tables and summary."""

    outdir: Path
    requests: pa.Table
    steps: pa.Table
    collectives: pa.Table | None
    """None when the run recorded no collectives (no ``collectives.parquet``)."""
    summary: dict[str, Any]
    moe: pa.Table | None = None
    """Per-MoE-layer EP metrics; None without ``moe.parquet`` (no EP all-to-alls)."""


class RunWriter:
    """Writes one run's output directory. The constructor only checks the path.

    ``timeline_max_steps``: the timeline shows the first N steps of every replica (None: no
    step cap, only the event cap); ``timeline=False`` writes none.
    """

    def __init__(self, outdir: str | Path, *, timeline: bool = True,
                 timeline_max_steps: int | None = DEFAULT_MAX_STEPS) -> None:
        self.outdir = Path(outdir)
        self.timeline = timeline
        self.timeline_max_steps = timeline_max_steps
        self._check_dir()

    def _check_dir(self) -> None:
        if self.outdir.exists() and not self.outdir.is_dir():
            raise OutputError(f"output directory {self.outdir} is a file; pass a directory "
                              "path (it is created if missing)")

    def write(self, *, requests: TableLike, steps: TableLike,
              collectives: TableLike | None = None,
              summary: Mapping[str, Any], moe: TableLike | None = None) -> dict[str, Any]:
        """Write the tables, ``timeline.json``, then ``summary.json``; return the summary
        as written (with a ``timeline`` entry). A stale ``collectives.parquet`` from an
        earlier run in the same directory is removed when this run has none."""
        tables = {"requests": _as_table(requests, "requests"), "steps": _as_table(steps, "steps")}
        if collectives is not None:
            table = _as_table(collectives, "collectives")
            if table.num_rows:
                tables["collectives"] = table
        if moe is not None:
            table = _as_table(moe, "moe")
            if table.num_rows:
                tables["moe"] = table
        self._check_dir()
        try:
            self.outdir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create output directory {self.outdir}: {exc}") from exc
        for stale in (SUMMARY_FILE, TIMELINE_FILE):  # both describe the tables being replaced
            with contextlib.suppress(FileNotFoundError):
                (self.outdir / stale).unlink()
        for name, filename in FILES.items():
            if name in tables:
                write_table_atomic(self.outdir / filename, tables[name])
            else:
                with contextlib.suppress(FileNotFoundError):
                    (self.outdir / filename).unlink()
        summary = dict(summary)
        summary["timeline"] = self._write_timeline(tables, summary)
        write_json_atomic(self.outdir / SUMMARY_FILE, summary)
        return summary

    def _write_timeline(self, tables: dict[str, pa.Table],
                        summary: dict[str, Any]) -> dict[str, Any] | None:
        if not self.timeline:
            return None
        try:
            info = write_timeline(self.outdir, steps=tables["steps"],
                                  collectives=tables.get("collectives"), summary=summary,
                                  max_steps=self.timeline_max_steps)
        except Exception as exc:  # noqa: BLE001 - the tables matter more than their picture
            return {"error": f"{type(exc).__name__}: {exc}"}
        return {"file": TIMELINE_FILE, "num_events": info.num_events,
                "num_steps_shown": info.num_steps_shown,
                "num_steps_total": info.num_steps_total, "truncated": info.truncated}

    def finish(self, *, requests: TableLike, steps: TableLike,
               collectives: TableLike | None = None, mode: str, config: Any,
               nodes: Mapping[str, Any] | None = None,
               extra: Mapping[str, Any] | None = None,
               moe: TableLike | None = None) -> dict[str, Any]:
        """Write a complete run (summary ``complete: true``); return the summary."""
        return self._write_run(complete=True, requests=requests, steps=steps,
                               collectives=collectives, mode=mode, config=config, nodes=nodes,
                               extra=extra, moe=moe)

    def flush_partial(self, *, requests: TableLike, steps: TableLike,
                      collectives: TableLike | None = None, mode: str, config: Any,
                      nodes: Mapping[str, Any] | None = None,
                      extra: Mapping[str, Any] | None = None,
                      error: BaseException | str | None = None,
                      moe: TableLike | None = None) -> dict[str, Any]:
        """Write what was recorded so far with ``complete: false`` (and ``extra.error``),
        from an ``except`` block before re-raising. If the metrics cannot be computed from
        the partial tables, the summary has ``metrics: null`` and ``extra.metrics_error``
        rather than a second exception hiding the first."""
        extra = dict(extra or {})
        if error is not None:
            extra["error"] = (f"{type(error).__name__}: {error}"
                              if isinstance(error, BaseException) else str(error))
        return self._write_run(complete=False, requests=requests, steps=steps,
                               collectives=collectives, mode=mode, config=config, nodes=nodes,
                               extra=extra, moe=moe)

    def _write_run(self, *, complete: bool, requests: TableLike, steps: TableLike,
                   collectives: TableLike | None, mode: str, config: Any,
                   nodes: Mapping[str, Any] | None,
                   extra: Mapping[str, Any] | None,
                   moe: TableLike | None = None) -> dict[str, Any]:
        req = _as_table(requests, "requests")
        stp = _as_table(steps, "steps")
        col = _as_table(collectives, "collectives") if collectives is not None else None
        if col is not None and col.num_rows == 0:
            col = None
        extra = dict(extra or {})
        try:
            metrics = compute_metrics(req, stp, col)
        except Exception as exc:  # noqa: BLE001 - a partial flush must not mask the run's error
            if complete:
                raise
            metrics = None
            extra["metrics_error"] = f"{type(exc).__name__}: {exc}"
        summary = build_summary(complete=complete, mode=mode, config=config, metrics=metrics,
                                nodes=nodes, extra=extra)
        return self.write(requests=req, steps=stp, collectives=col, summary=summary, moe=moe)


def _read_table(path: Path, name: str) -> pa.Table:
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise OutputError(f"cannot read {path}: {exc}") from exc
    meta = table.schema.metadata or {}
    version = meta.get(VERSION_KEY, b"").decode()
    if version != SCHEMA_VERSION:
        raise OutputError(f"{path} has schema version {version or 'none'}; this emulator reads "
                          f"version {SCHEMA_VERSION} (re-run to regenerate it)")
    if meta.get(TABLE_KEY, b"").decode() != name:
        raise OutputError(f"{path} is not a {name} table")
    return table


def read_run(outdir: str | Path) -> Run:
    """Read a run directory written by :class:`RunWriter` (complete or partial)."""
    outdir = Path(outdir)
    summary_path = outdir / SUMMARY_FILE
    if not summary_path.is_file():
        raise OutputError(f"{outdir} is not a run directory: {SUMMARY_FILE} is missing")
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, ValueError) as exc:
        raise OutputError(f"cannot read {summary_path}: {exc}") from exc
    tables: dict[str, pa.Table | None] = {}
    for name, filename in FILES.items():
        path = outdir / filename
        if name in OPTIONAL and not path.exists():
            tables[name] = None
            continue
        if not path.is_file():
            raise OutputError(f"{outdir} is incomplete: {filename} is missing")
        tables[name] = _read_table(path, name)
    return Run(outdir=outdir, requests=tables["requests"], steps=tables["steps"],
               collectives=tables["collectives"], summary=summary, moe=tables["moe"])
