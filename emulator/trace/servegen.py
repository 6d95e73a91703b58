"""Sample a per-request trace from ServeGen's DeepSeek-R1 workload characterization.

Data (Xiang et al., "ServeGen", arXiv:2505.09999; Apache-2.0; see
``../shared/data/traces/servegen-deepseek-r1/SOURCE.md``): for each client N,

- ``chunk-N-trace.csv`` (no header): one row per 600-s window of the day,
  ``window_start_s, rate_req_per_s, cv, pattern, param1, param2``; ``pattern`` is ``Gamma``
  (shape, scale) or ``Weibull`` (shape, scale) for the inter-arrival times, empty when the
  client sent nothing;
- ``chunk-N-dataset.json``: per 6-hour window (``"0"``, ``"21600"``, ...) the PDFs
  ``input_tokens``, ``output_tokens`` and ``reason_ratio`` as strings holding Python dict
  literals ``{value: probability}``, parsed with :func:`ast.literal_eval` (never ``eval``).

Sampling, window by window in time order and, within a window, client by client (ascending
id), all from one seeded numpy Generator:

- arrivals: a renewal process restarted at each window start, with gaps drawn from the
  window's Gamma or Weibull *shape*, the scale set so the mean gap is 1 / ``rate``;
  arrivals past the window end are dropped. The fitted scales (param2) imply 1.77M
  requests/day against the 1.38M that the measured rates give, so the shape (burstiness)
  is kept and the measured rate sets the volume;
- lengths: input, output and reason ratio are drawn *independently* from the client's PDFs
  for the 6-hour window holding the arrival (ServeGen's own sampler uses one shared uniform
  draw for all three; neither choice is measured); ``reasoning_tokens =
  round(reason_ratio * output_tokens)``.

The merged arrivals are sorted stably and the first ``num_requests`` in
``[start_s, start_s + duration_s)`` are kept, with times relative to ``start_s``. Because
windows are generated in order, a smaller ``num_requests`` with the same seed gives a prefix
of a larger one.
"""

from __future__ import annotations

import ast
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from emulator.errors import TraceError
from emulator.trace.schema import Trace

WINDOW_S = 600.0  # arrival-process window (trace.csv rows)
PDF_WINDOW_S = 21600  # length-PDF window (dataset.json keys)
DAY_S = 86400.0
PDF_FIELDS = ("input_tokens", "output_tokens", "reason_ratio")

Progress = Callable[[int, int], None]


@dataclass(slots=True)
class _Client:
    client_id: int
    window_start_s: np.ndarray  # float64 [W]
    pattern: np.ndarray  # object [W]: "Gamma", "Weibull" or None
    rate_per_s: np.ndarray  # float64 [W], measured mean request rate
    shape: np.ndarray  # float64 [W], fitted shape of the inter-arrival distribution
    dataset_path: Path
    pdfs: dict[int, dict[str, tuple[np.ndarray, np.ndarray]]] | None = None  # lazy


def _client_ids(folder: Path) -> list[int]:
    ids = sorted(int(p.name.split("-")[1]) for p in folder.glob("chunk-*-trace.csv")
                 if p.name.split("-")[1].isdigit())
    if not ids:
        raise TraceError(f"{folder}: no chunk-N-trace.csv files; pass the ServeGen "
                         f"data/reason/deepseek-r1 folder")
    return ids


def _load_client(folder: Path, cid: int) -> _Client:
    path = folder / f"chunk-{cid}-trace.csv"
    if not path.is_file():
        raise TraceError(f"{path}: no such file (client {cid} is not in {folder})")
    names = ["window_start_s", "rate", "cv", "pattern", "param1", "param2"]
    types = {"window_start_s": pa.float64(), "rate": pa.float64(), "cv": pa.float64(),
             "pattern": pa.string(), "param1": pa.float64(), "param2": pa.float64()}
    try:
        table = pacsv.read_csv(path, read_options=pacsv.ReadOptions(column_names=names),
                               convert_options=pacsv.ConvertOptions(column_types=types))
    except pa.ArrowInvalid as exc:
        raise TraceError(f"{path.name}: {str(exc).splitlines()[0]}") from exc
    col = {n: table.column(n).to_numpy(zero_copy_only=False) for n in names}
    pattern = np.array([p or None for p in col["pattern"]], dtype=object)
    known = np.isin(pattern, ["Gamma", "Weibull", None])
    params_ok = (col["param1"] > 0) & (col["param2"] > 0) & (col["rate"] > 0)
    bad = np.flatnonzero(~known | ((pattern != None) & ~params_ok))  # noqa: E711 (elementwise)
    if bad.size:
        i = int(bad[0])
        raise TraceError(f"{path.name}: line {i + 1}: pattern {pattern[i]!r} with parameters "
                         f"({col['param1'][i]}, {col['param2'][i]}) and rate {col['rate'][i]}; "
                         f"expected Gamma or Weibull with positive rate, shape and scale")
    off = np.flatnonzero(col["window_start_s"] != np.arange(len(pattern)) * WINDOW_S)
    if off.size:
        i = int(off[0])
        raise TraceError(f"{path.name}: line {i + 1}: window start {col['window_start_s'][i]} "
                         f"should be {i * WINDOW_S:.0f} (one row per 600-s window, in order)")
    return _Client(cid, col["window_start_s"], pattern, col["rate"], col["param1"],
                   folder / f"chunk-{cid}-dataset.json")


def _pdf(path: Path, window: str, field: str, text: object) -> tuple[np.ndarray, np.ndarray]:
    where = f"{path.name}: window {window}, field {field}"
    if not isinstance(text, str):
        raise TraceError(f"{where}: expected a string holding a dict literal")
    try:
        table = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError) as exc:
        raise TraceError(f"{where}: not a Python dict literal ({type(exc).__name__})") from exc
    if not isinstance(table, dict):
        raise TraceError(f"{where}: expected a dict {{value: probability}}")
    values = np.fromiter(table.keys(), dtype=np.float64, count=len(table))
    probs = np.fromiter(table.values(), dtype=np.float64, count=len(table))
    if np.any(~np.isfinite(probs) | (probs < 0)) or (probs.size and probs.sum() <= 0):
        raise TraceError(f"{where}: probabilities must be finite, >= 0 and not all zero")
    return values, probs / probs.sum() if probs.size else probs


def _pdfs(client: _Client) -> dict[int, dict[str, tuple[np.ndarray, np.ndarray]]]:
    if client.pdfs is None:
        path = client.dataset_path
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise TraceError(f"{path}: no such file") from None
        except json.JSONDecodeError as exc:
            raise TraceError(f"{path.name}: line {exc.lineno}: invalid JSON ({exc.msg})") from exc
        client.pdfs = {int(w): {f: _pdf(path, w, f, fields.get(f)) for f in PDF_FIELDS}
                       for w, fields in raw.items()}
    return client.pdfs


def _window_arrivals(client: _Client, w: int, rng: np.random.Generator) -> np.ndarray:
    """Arrival times in [start, start + 600) from the window's renewal process."""
    shape, mean_gap_s = client.shape[w], 1.0 / client.rate_per_s[w]
    if client.pattern[w] == "Gamma":
        def draw(n):
            return rng.gamma(shape, mean_gap_s / shape, n)
    else:
        weibull_scale = mean_gap_s / math.gamma(1.0 + 1.0 / shape)
        def draw(n):
            return weibull_scale * rng.weibull(shape, n)
    times, elapsed = [], 0.0
    while elapsed < WINDOW_S:
        more = elapsed + np.cumsum(draw(int(WINDOW_S / mean_gap_s * 1.25) + 16))
        times.append(more)
        elapsed = float(more[-1])
    t = np.concatenate(times)
    return client.window_start_s[w] + t[t < WINDOW_S]


def _lengths(client: _Client, t: np.ndarray, rng: np.random.Generator):
    key = int(t[0] // PDF_WINDOW_S * PDF_WINDOW_S)
    pdfs = _pdfs(client).get(key)
    if pdfs is None or any(pdfs[f][0].size == 0 for f in PDF_FIELDS):
        raise TraceError(f"{client.dataset_path.name}: window {key} has no length PDFs but "
                         f"chunk-{client.client_id}-trace.csv has arrivals in it")
    n = t.shape[0]
    draws = [rng.choice(pdfs[f][0], size=n, p=pdfs[f][1]) for f in PDF_FIELDS]
    prompt = np.maximum(1, np.rint(draws[0])).astype(np.int32)
    output = np.maximum(1, np.rint(draws[1])).astype(np.int32)
    reasoning = np.minimum(np.rint(draws[2] * output), output).astype(np.int32)
    return prompt, output, reasoning


def import_servegen(folder: str | os.PathLike, *, num_requests: int | None, seed: int = 0,
                    start_s: float = 0.0, duration_s: float | None = None,
                    clients: Sequence[int] | None = None,
                    progress: Progress | None = None) -> Trace:
    """Sample up to ``num_requests`` requests (None: all) arriving in
    ``[start_s, start_s + duration_s)`` (default: to the end of the day) from the chosen
    ``clients`` (default: all). ``progress(done, total)`` is called once per 600-s window.
    Raises TraceError if fewer than ``num_requests`` requests arrive in the span."""
    root = Path(folder)
    if not root.is_dir():
        raise TraceError(f"{root}: no such folder")
    end_s = DAY_S if duration_s is None else start_s + duration_s
    if not 0 <= start_s < end_s <= DAY_S:
        raise TraceError(f"start_s {start_s} / duration_s {duration_s} must give a span inside "
                         f"the day [0, {DAY_S:.0f}) s")
    if num_requests is not None and num_requests < 1:
        raise TraceError(f"num_requests must be >= 1, got {num_requests}")
    ids = _client_ids(root) if clients is None else sorted(set(clients))
    loaded = [_load_client(root, c) for c in ids]
    rng = np.random.default_rng(seed)
    first_w, last_w = int(start_s // WINDOW_S), int(np.ceil(end_s / WINDOW_S))
    parts: list[tuple[np.ndarray, ...]] = []
    count = 0
    for w in range(first_w, last_w):
        window = []
        for client in loaded:
            if w >= client.pattern.shape[0] or client.pattern[w] is None:
                continue
            t = _window_arrivals(client, w, rng)
            t = t[(t >= start_s) & (t < end_s)]
            if t.size:
                window.append((t, *_lengths(client, t, rng)))
        if window:
            cols = [np.concatenate(c) for c in zip(*window)]
            order = np.argsort(cols[0], kind="stable")
            parts.append(tuple(c[order] for c in cols))
            count += order.size
        if progress is not None:
            progress(w - first_w + 1, last_w - first_w)
        if num_requests is not None and count >= num_requests:
            break
    if num_requests is not None and count < num_requests:
        raise TraceError(f"{root.name}: only {count} requests arrive in [{start_s}, {end_s}) s "
                         f"for the chosen clients; lower num_requests or widen the span")
    if not parts:
        raise TraceError(f"{root.name}: no requests arrive in [{start_s}, {end_s}) s")
    arrival, prompt, output, reasoning = (np.concatenate(c) for c in zip(*parts))
    keep = count if num_requests is None else num_requests
    width = max(6, len(str(keep - 1)))
    req_ids = np.array([f"servegen-{i:0{width}d}" for i in range(keep)], dtype=object)
    trace = Trace(req_ids, arrival[:keep] - start_s, prompt[:keep], output[:keep],
                  reasoning[:keep])
    return trace.validate(f"{root.name} (sampled)")
