"""``report.html``: one self-contained HTML page of a run (or of a validation pair) with its
summary, settings and matplotlib plots embedded as base64 PNGs. It loads nothing from the
network (no scripts, fonts or styles from elsewhere), so it opens offline and can be mailed.

Plots:

1. CDFs of TTFT, TPOT and E2E over the requests where each is defined.
2. Over time (target seconds, up to ``MAX_POINTS`` samples): KV use per DP replica (blocks
   used / pool, after each step at stage 0), requests running (the requests of the latest
   plan of every replica and PP micro-batch slot, until the replica's last step ends) and
   waiting (arrived, unfinished and not running).
3. Time per rank by kind: compute (step rows, averaged over the (replica, stage) pairs), and
   per mesh axis the collectives' transfer and sync-wait (an emulation's measured
   ``by_axis``; a simulation has only the modeled TP/EP communication of its step rows, no
   sync-wait). With collectives, a second panel splits it per rank (stragglers show).
4. Validation (a measured emulation with a predicted simulation): each step's predicted
   against measured time (rows joined on replica, step, stage), and the latency CDFs of
   both runs overlaid.

What is a validation directory: ``write_report(measured_dir, predicted=sim_dir)``, or a
directory with no ``summary.json`` of its own that holds one emulated and one simulated run
directory (any names); its ``validation.json``, if present, is shown as a table.

When the page has loaded, a script sets ``data-plots-loaded`` on ``<body>`` to the number of
plots that decoded (or ``failed``), which is what the headless-browser test reads.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from emulator.atomic import write_text_atomic
from emulator.metrics.format import format_seconds
from emulator.metrics.io import OutputError, Run, read_run

REPORT_FILE = "report.html"
MAX_POINTS = 2000


def _col(t: pa.Table, name: str) -> np.ndarray:
    return t.column(name).to_numpy(zero_copy_only=False)


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# --- plots -----------------------------------------------------------------------------------
def plot_cdfs(runs: Mapping[str, Run]) -> str:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, (key, label) in zip(axes, (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("e2e_s", "E2E"))):
        for i, (name, run) in enumerate(runs.items()):
            v = np.sort(_col(run.requests, key))
            v = v[np.isfinite(v)]
            if v.size:
                ax.step(v, np.arange(1, v.size + 1) / v.size, where="post",
                        ls="-" if i == 0 else "--", label=f"{name} (n={v.size})")
        ax.set(xlabel=f"{label} (s)", ylabel="fraction of requests", title=f"{label} CDF",
               ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return _png(fig)


def over_time(run: Run) -> dict[str, Any]:
    """Sampled series: t, kv[replica] (fraction), running, waiting."""
    st, rq = run.steps, run.requests
    arrival, finish = _col(rq, "arrival_s"), _col(rq, "finish_s")
    end_all = _col(st, "end_s")
    t_max = float(np.nanmax(np.r_[end_all, finish[np.isfinite(finish)], arrival, 0.0]))
    t = np.linspace(0.0, t_max, MAX_POINTS)
    first = _col(st, "stage") == 0
    replica, mb = _col(st, "replica")[first], _col(st, "micro_batch")[first]
    start = _col(st, "start_s")[first]
    used, total = _col(st, "kv_blocks_used")[first], _col(st, "kv_blocks_total")[first]
    nreq = _col(st, "num_requests")[first]
    kv: dict[int, np.ndarray] = {}
    running = np.zeros_like(t)
    for r in np.unique(replica).tolist():
        sel = replica == r
        last_end = float(end_all[_col(st, "replica") == r].max())
        o = np.argsort(start[sel], kind="stable")
        s, u, tot = start[sel][o], used[sel][o], total[sel][o]
        idx = np.searchsorted(s, t, side="right") - 1
        live = (idx >= 0) & (t <= last_end)
        kv[r] = np.where(live, u[np.maximum(idx, 0)] / np.maximum(tot[np.maximum(idx, 0)], 1), 0.0)
        for m in np.unique(mb[sel]).tolist():
            sm = sel & (mb == m)
            o = np.argsort(start[sm], kind="stable")
            s, n = start[sm][o], nreq[sm][o]
            idx = np.searchsorted(s, t, side="right") - 1
            running += np.where((idx >= 0) & (t <= last_end), n[np.maximum(idx, 0)], 0)
    arrived = np.searchsorted(np.sort(arrival), t, side="right")
    done = np.searchsorted(np.sort(finish[np.isfinite(finish)]), t, side="right")
    waiting = np.maximum(arrived - done - running, 0)
    return {"t": t, "kv": kv, "running": running, "waiting": waiting}


def plot_over_time(run: Run) -> str:
    plt = _pyplot()
    series = over_time(run)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(12, 5.4), sharex=True)
    t = series["t"]
    for r, kv in series["kv"].items():
        if len(series["kv"]) <= 8 or r == 0:
            ax1.plot(t, kv * 100, lw=1, label=f"replica {r}")
    if len(series["kv"]) > 8:
        ax1.plot(t, np.max(list(series["kv"].values()), axis=0) * 100, lw=1, label="max")
    ax1.set(ylabel="KV blocks used (%)", title="KV cache use per DP replica", ylim=(0, 105))
    ax1.legend(fontsize=7, loc="upper right")
    ax2.plot(t, series["running"], lw=1, label="running")
    ax2.plot(t, series["waiting"], lw=1, label="waiting")
    ax2.set(xlabel="time (s)", ylabel="requests", title="requests running and waiting")
    ax2.legend(fontsize=7, loc="upper right")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def breakdown(run: Run) -> dict[str, float]:
    """Seconds per rank (mean over ranks) by kind: compute, then AXIS transfer / sync-wait."""
    st = run.steps
    pairs = len(set(zip(_col(st, "replica").tolist(), _col(st, "stage").tolist()))) or 1
    out = {"compute": float(_col(st, "compute_s").sum()) / pairs}
    by_axis = ((run.summary.get("metrics") or {}).get("by_axis") or {})
    if by_axis:
        for axis, v in by_axis.items():
            out[f"{axis} transfer"] = float(v["transfer_s"])
            out[f"{axis} sync-wait"] = float(v["sync_wait_s"])
    else:
        out["comm (modeled, no sync-wait)"] = float(_col(st, "comm_s").sum()) / pairs
    return out


_AXIS_COLORS = {"tp": ("tab:orange", "tab:red"), "pp": ("tab:green", "darkgreen"),
                "ep": ("tab:purple", "indigo"), "dp": ("tab:brown", "saddlebrown"),
                "world": ("tab:gray", "black")}


def _color(label: str) -> str:
    """One colour per (axis, transfer | sync-wait), the same in both breakdown panels."""
    if label == "compute":
        return "tab:blue"
    transfer, sync = _AXIS_COLORS.get(label.split()[0], ("tab:orange", "tab:red"))
    return sync if "sync" in label else transfer


def plot_breakdown(run: Run) -> str:
    plt = _pyplot()
    parts = breakdown(run)
    per_rank = run.collectives is not None and run.collectives.num_rows > 0
    fig, axes = plt.subplots(1, 2 if per_rank else 1, figsize=(12 if per_rank else 7, 3.8))
    ax = axes[0] if per_rank else axes
    names, values = list(parts), [parts[k] for k in parts]
    ax.barh(names[::-1], values[::-1], color=[_color(n) for n in names[::-1]])
    ax.set(xlabel="seconds per rank (mean over ranks)", title="compute / communication / sync-wait")
    ax.grid(alpha=0.3, axis="x")
    if per_rank:
        c = run.collectives
        rank, axis = _col(c, "rank"), _col(c, "axis").astype(str)
        transfer, sync = _col(c, "transfer_s"), _col(c, "sync_wait_s")
        ranks = np.unique(rank)
        left = np.zeros(ranks.size)
        ax2 = axes[1]
        for a in sorted(set(axis.tolist())):
            for label, values_ in ((f"{a} transfer", transfer), (f"{a} sync-wait", sync)):
                w = np.array([values_[(rank == r) & (axis == a)].sum() for r in ranks])
                ax2.barh([f"rank {r}" for r in ranks], w, left=left, label=label,
                         color=_color(label))
                left += w
        ax2.invert_yaxis()
        ax2.set(xlabel="seconds", title="collectives per rank")
        ax2.legend(fontsize=7)
        ax2.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return _png(fig)


def plot_validation(measured: Run, predicted: Run) -> str:
    plt = _pyplot()
    key = ("replica", "step", "stage")

    def durations(run: Run) -> dict[tuple, float]:
        st = run.steps
        d = _col(st, "end_s") - _col(st, "start_s")
        return dict(zip(zip(*(_col(st, k).tolist() for k in key)), d.tolist()))

    m, p = durations(measured), durations(predicted)
    common = sorted(set(m) & set(p))
    fig, ax = plt.subplots(figsize=(6, 5))
    if common:
        x = np.array([m[k] for k in common]) * 1e3
        y = np.array([p[k] for k in common]) * 1e3
        ax.scatter(x, y, s=8, alpha=0.6)
        lo, hi = min(x.min(), y.min()), max(x.max(), y.max())
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="predicted = measured")
        ax.legend(fontsize=7)
    ax.set(xlabel="measured step time (ms)", ylabel="predicted step time (ms)",
           title=f"steps: predicted vs measured ({len(common)} joined rows)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


# --- page ------------------------------------------------------------------------------------
_STYLE = """body{font-family:sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:right}th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
img{max-width:100%;display:block;margin:0.5em 0 1.5em}code{background:#f4f4f4;padding:1px 3px}"""

_SCRIPT = """window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.length > 0 && imgs.every(function (i) { return i.complete && i.naturalWidth > 0; });
  document.body.setAttribute('data-plots-loaded', ok ? String(imgs.length) : 'failed');
});"""


def _table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _metric_rows(metrics: Mapping[str, Any]) -> list[tuple[str, str]]:
    rows = []
    for key, value in metrics.items():
        if isinstance(value, Mapping):
            continue
        if key.endswith("_s") and not key.endswith("_per_s") and value is not None:
            value = format_seconds(value)
        elif isinstance(value, float):
            value = f"{value:,.4g}"
        rows.append((key, "-" if value is None else str(value)))
    return rows


def _img(b64: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def _resolve(outdir: Path, predicted: Path | None) -> tuple[dict[str, Run], dict | None]:
    validation = None
    vpath = outdir / "validation.json"
    if vpath.is_file():
        validation = json.loads(vpath.read_text())
    if (outdir / "summary.json").is_file():
        runs = {"measured" if predicted else read_run(outdir).summary.get("mode", "run"):
                read_run(outdir)}
    else:
        found = [read_run(d) for d in sorted(outdir.iterdir()) if (d / "summary.json").is_file()] \
            if outdir.is_dir() else []
        by_mode = {r.summary.get("mode"): r for r in found}
        if "emulate" in by_mode and "simulate" in by_mode and predicted is None:
            return {"measured": by_mode["emulate"], "predicted": by_mode["simulate"]}, validation
        if len(found) != 1:
            raise OutputError(f"{outdir} is not a run directory (no summary.json) and does not "
                              "hold one emulated and one simulated run; pass a run directory")
        runs = {found[0].summary.get("mode", "run"): found[0]}
    if predicted is not None:
        runs["predicted"] = read_run(predicted)
    return runs, validation


def render_report(runs: Mapping[str, Run], validation: Mapping[str, Any] | None = None) -> str:
    first = next(iter(runs.values()))
    cfg = first.summary.get("config") or {}
    title = (f"{first.summary.get('mode', 'run')}: {cfg.get('model', '?')} on "
             f"{cfg.get('hardware', '?')}, dp={cfg.get('dp', 1)} tp={cfg.get('tp', 1)} "
             f"pp={cfg.get('pp', 1)} ep={cfg.get('ep', 1)}")
    parts = [f"<h1>{html.escape(title)}</h1>"]
    for name, run in runs.items():
        state = "complete" if run.summary.get("complete") else "INCOMPLETE"
        parts.append(f"<h2>{html.escape(name)}: <code>{html.escape(str(run.outdir))}</code> "
                     f"({state})</h2>")
        parts.append(_table(_metric_rows(run.summary.get("metrics") or {}), ("metric", "value")))
        tl = run.summary.get("timeline") or {}
        if tl.get("file"):
            shown = (f"the first {tl['num_steps_shown']} of {tl['num_steps_total']} steps"
                     if tl.get("truncated") else f"all {tl['num_steps_total']} steps")
            parts.append(f"<p><code>{html.escape(tl['file'])}</code> holds {shown} of every "
                         "replica as Chrome trace events: open it in Perfetto or "
                         "chrome://tracing.</p>")
    if validation:
        rows = [(k, v if not isinstance(v, float) else f"{v:+.3f}")
                for k, v in validation.items() if not isinstance(v, (Mapping, list))]
        parts.append("<h2>validation.json</h2>" + _table(rows, ("metric", "value")))
    parts.append("<h2>Latency CDFs</h2>" + _img(plot_cdfs(runs), "TTFT, TPOT and E2E CDFs"))
    for name, run in runs.items():
        parts.append(f"<h2>KV use, running and waiting requests ({html.escape(name)})</h2>"
                     + _img(plot_over_time(run), f"KV use and requests over time, {name}"))
        parts.append(f"<h2>Compute / communication / sync-wait ({html.escape(name)})</h2>"
                     + _img(plot_breakdown(run), f"time breakdown, {name}"))
    if "measured" in runs and "predicted" in runs:
        parts.append("<h2>Predicted vs measured</h2>"
                     + _img(plot_validation(runs["measured"], runs["predicted"]),
                            "predicted against measured step times"))
    parts.append("<h2>Settings</h2>" + _table(
        [(k, json.dumps(v)) for k, v in cfg.items()], ("setting", "value")))
    return ("<!DOCTYPE html><html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
            + "\n".join(parts) + f"<script>{_SCRIPT}</script></body></html>\n")


def write_report(outdir: str | Path, *, predicted: str | Path | None = None,
                 output: str | Path | None = None) -> Path:
    """Write the report of a run (or validation) directory; return the HTML file's path
    (default ``OUTDIR/report.html``)."""
    outdir = Path(outdir)
    runs, validation = _resolve(outdir, Path(predicted) if predicted else None)
    path = Path(output) if output else outdir / REPORT_FILE
    write_text_atomic(path, render_report(runs, validation))
    return path
