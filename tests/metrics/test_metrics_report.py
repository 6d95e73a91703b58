"""report.html: self-contained (plots inline, nothing from the network), exact series and
breakdowns, validation pairs, and a real render in headless chromium."""

from __future__ import annotations

import base64
import re
import shutil
import struct
import subprocess

import numpy as np
import pytest

from emulator.build import build_run
from emulator.config import build_config
from emulator.metrics.io import OutputError, RunWriter, read_run
from emulator.metrics.records import CollectiveRecords, RequestRecords, StepRecords
from emulator.metrics.report import breakdown, over_time, write_report
from emulator.simulator.run import simulate
from emulator.trace.io import write_trace
from emulator.trace.synth import synth_trace

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run",
                  # any name lookup fails: a page that needs the network cannot load it
                  "--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=10000")


def _emulated_run(outdir):
    """A hand-made 2-rank TP emulation: 2 requests, 2 steps, one all-reduce per step."""
    requests = RequestRecords.from_arrays(
        request_id=["a", "b"], replica=[0, 0], arrival_s=[0.0, 0.0], first_token_s=[1.0, 1.0],
        finish_s=[2.0, 3.0], prompt_tokens=[8, 16], output_tokens=[2, 3], num_preemptions=[0, 0])
    steps = StepRecords()
    steps.append(0, 0, 0, 0.0, 1.0, 2, 24, 0, 0.75, 0.25, 2, 8)
    steps.append(0, 1, 0, 1.0, 2.0, 2, 0, 2, 0.5, 0.5, 4, 8)
    steps.append(0, 2, 0, 2.0, 3.0, 1, 0, 1, 0.5, 0.5, 2, 8)
    colls = CollectiveRecords()
    for step, entry in ((0, [0.5, 0.75]), (1, [1.25, 1.5]), (2, [2.5, 2.5])):
        colls.extend(dict(replica=0, step=step, stage=0, layer=0, rank=np.array([0, 1]),
                          axis="tp", op="all_reduce", group="tp/dp0/pp0", seq=0, bytes=1024,
                          entry_s=np.array(entry), exit_s=np.array(entry) + 0.25 + 0.25 *
                          (np.array(entry) == min(entry))))
    RunWriter(outdir).finish(requests=requests, steps=steps, collectives=colls, mode="emulate",
                             config={"model": "tiny", "hardware": "h100", "tp": 2},
                             nodes={"rank_node_ip": ["10.0.0.1", "10.0.0.1"]})
    return read_run(outdir)


@pytest.fixture(scope="module")
def sim_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    trace = root / "batch.arrow"
    write_trace(synth_trace(num_requests=16, lengths="uniform", arrival="poisson", rate=50.0,
                            prompt_tokens=(10, 300), output_tokens=(3, 60), seed=5), trace)
    cfg = build_config(trace=trace, model="tiny", hardware="h100", dp=2, tp=2,
                       max_num_batched_tokens=256)
    tables = simulate(build_run(cfg))
    RunWriter(root / "sim").finish(requests=tables.requests, steps=tables.steps,
                                   mode="simulate", config=cfg)
    return root / "sim"


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_report_is_self_contained_with_inline_plots(sim_dir):
    path = write_report(sim_dir)
    assert path == sim_dir / "report.html"
    page = path.read_text()
    images = _images(page)
    assert len(images) == 3  # CDFs, over time, breakdown
    assert all(w > 500 and h > 200 for w, h in map(_png_size, images))
    # nothing is fetched: no external src/href, stylesheet links or remote scripts
    assert not re.search(r'(src|href)\s*=\s*"(?!data:)', page)
    assert "<link" not in page and "http://" not in page and "https://" not in page
    assert "simulate: tiny on h100, dp=2 tp=2 pp=1 ep=1" in page
    assert "timeline.json</code> holds all" in page


def test_breakdown_and_series_exact(tmp_path):
    run = _emulated_run(tmp_path / "emu")
    # compute: (0.75 + 0.5 + 0.5) over one (replica, stage) pair; tp, mean over the 2 ranks:
    # rank 0 waits 0.25 in steps 0 and 1; both transfer 0.25, 0.25 and 0.5 (step 2)
    assert breakdown(run) == {"compute": 1.75, "tp transfer": 1.0, "tp sync-wait": 0.25}
    series = over_time(run)
    t = series["t"]
    assert t[0] == 0.0 and t[-1] == 3.0 and t.size == 2000
    at = {x: int(np.searchsorted(t, x)) for x in (0.5, 1.5, 2.5)}
    assert [series["running"][i] for i in at.values()] == [2, 2, 1]
    assert [series["waiting"][i] for i in at.values()] == [0, 0, 0]
    assert [series["kv"][0][i] for i in at.values()] == [0.25, 0.5, 0.25]


def test_emulation_and_validation_pages(sim_dir, tmp_path):
    emu = tmp_path / "emu"
    _emulated_run(emu)
    page = write_report(emu).read_text()
    assert len(_images(page)) == 3 and "collectives per rank" not in page  # text is in the PNG
    # a validation directory: one emulated and one simulated run, plus validation.json
    pair = tmp_path / "pair"
    shutil.copytree(emu, pair / "emulated")
    shutil.copytree(sim_dir, pair / "simulated")
    (pair / "validation.json").write_text('{"drain_time_error": 0.125}')
    page = write_report(pair).read_text()
    assert len(_images(page)) == 6  # CDFs, 2 x (over time, breakdown), predicted vs measured
    assert "Predicted vs measured" in page and "+0.125" in page
    with pytest.raises(OutputError, match="not a run directory"):
        write_report(tmp_path / "nothing-here")


def _chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))
                 if p), None)


@pytest.mark.browser
@pytest.mark.timeout(120)
@pytest.mark.skipif(_chromium() is None,
                    reason="headless chromium not installed (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(sim_dir, tmp_path):
    page = write_report(sim_dir, output=tmp_path / "report.html")
    # the page's load handler: every <img> complete with a decoded width
    assert _loaded_marker(page, tmp_path / "profile") == 'data-plots-loaded="3"'
    # the check can fail: a plot whose PNG does not decode
    broken = tmp_path / "broken.html"
    broken.write_text(page.read_text().replace("base64,iVBOR", "base64,AAAA", 1))
    assert _loaded_marker(broken, tmp_path / "profile2") == 'data-plots-loaded="failed"'


def _loaded_marker(page, profile) -> str:
    profile.mkdir()
    proc = subprocess.run([_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                           "--dump-dom", page.as_uri()],
                          capture_output=True, text=True, timeout=90, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    body = re.search(r"<body[^>]*>", proc.stdout)
    assert body is not None, proc.stdout[:500]
    marker = re.search(r'data-plots-loaded="[^"]*"', body.group(0))
    return marker.group(0) if marker else body.group(0)
