"""Faults end an emulation within a bound, name what failed and keep the finished work.

Each fault test runs the real CLI (`python -m emulator emulate`) as a subprocess with its own
local Ray, injects one fault (the EMULATOR_FAULT test hook of emulator/runtime/faults.py, an
unreachable --address, or SIGINT) and checks: the exit code, the one-line message naming
the rank / node / address, that requests.parquet and steps.parquet hold exactly the steps
that finished (summary.json complete=false), and that no process of the run survives it
(every process the run started, Ray's included, inherits a marker in its environment).
The subprocess timeout is the bound on the time to exit.
"""

from __future__ import annotations

import glob
import json
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from emulator.errors import ConfigError
from emulator.runtime.faults import Fault, parse_fault

REPO = Path(__file__).resolve().parents[2]
TRACE = REPO / "traces" / "azure-conv-500.arrow"
BOUND_S = 75
"""Upper bound on one CLI run with a fault: Ray start-up (~10 s here) + workers (~10 s) +
the fault (collective timeout 3 s) + teardown; the subprocess is killed past it."""
NODE = r"\(node \d+\.\d+\.\d+\.\d+ [0-9a-f]{8}\)"


def _marked_pids(tag: str) -> list[int]:
    """Processes whose environment holds EMULATOR_TEST_TAG=tag."""
    needle = f"EMULATOR_TEST_TAG={tag}".encode()
    pids = []
    for proc in glob.glob("/proc/[0-9]*"):
        try:
            with open(f"{proc}/environ", "rb") as f:
                if needle in f.read():
                    pids.append(int(proc[6:]))
        except OSError:
            continue
    return pids


def _assert_nothing_left(tag: str) -> None:
    # Ray's processes notice their driver's exit within a moment; allow them 15 s.
    deadline = time.monotonic() + 15
    while _marked_pids(tag) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _marked_pids(tag) == []


def _emulate_cmd(outdir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "emulator", "emulate", "--trace", str(TRACE),
            "--model", "tiny", "--hardware", "h100", "--max-output-tokens", "8",
            "--timeout-s", "3", "-o", str(outdir), *extra]


INTERRUPTIBLE = ("import runpy, signal, sys; "
                 "signal.signal(signal.SIGINT, signal.default_int_handler); "
                 "sys.argv[0] = 'emulator'; runpy.run_module('emulator', run_name='__main__')")
"""``python -c`` code running the CLI with Python's Ctrl-C handler even when the tests were
started with SIGINT ignored (as a shell does for a job run in the background with ``&``;
the child would inherit that and never see the interrupt)."""


def _env(tag: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "EMULATOR_FAULT")}
    env.update(EMULATOR_TEST_TAG=tag, **extra)
    return env


def _run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=BOUND_S,
                          cwd=REPO)


def _error_line(stderr: str, prefix: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith(prefix)]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def _kept(outdir: Path) -> tuple[dict, list[int], int]:
    """(summary, steps of the finished plans, number of finished requests)."""
    summary = json.loads((outdir / "summary.json").read_text())
    steps = pq.read_table(outdir / "steps.parquet")
    requests = pq.read_table(outdir / "requests.parquet")
    stage0 = steps["stage"].to_numpy() == 0
    return (summary, sorted(steps["step"].to_numpy()[stage0].tolist()),
            int(np.isfinite(requests["finish_s"].to_numpy()).sum()))


# -- the test hook itself (no Ray) ------------------------------------------------------
def test_fault_spec_parses():
    assert parse_fault("kill:rank=1:step=3") == Fault("kill", 1, 3)
    assert parse_fault("skip:step=2:rank=0") == Fault("skip", 0, 2)


@pytest.mark.parametrize("text", ["kill", "kill:rank=1", "boom:rank=1:step=2",
                                  "kill:rank=x:step=2", "kill:rank=1:step=2:extra=1"])
def test_bad_fault_spec_names_the_variable(text):
    with pytest.raises(ConfigError, match=r"EMULATOR_FAULT=.* is not KIND:rank=R:step=S"):
        parse_fault(text)


# -- nothing from a config or trace file is evaluated or unpickled (no Ray) -------------
class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_config_and_trace_files_are_never_evaluated(tmp_path):
    marker = tmp_path / "executed"
    config = tmp_path / "run.yaml"
    config.write_text(f"trace: !!python/object/apply:os.system ['touch {marker}']\n")
    evil_trace = tmp_path / "trace.arrow"
    evil_trace.write_bytes(pickle.dumps(_Payload(marker)))
    for args in (["--config", str(config)], ["--trace", str(evil_trace)]):
        cmd = [sys.executable, "-m", "emulator", "emulate", *args, "--model", "tiny",
               "-o", str(tmp_path / "out")]
        result = _run(cmd, _env("none"))
        assert result.returncode == 2, result.stderr[-2000:]
        assert _error_line(result.stderr, "error: ")
        assert not marker.exists()
    assert not (tmp_path / "out").exists()


# -- faults, through the CLI ------------------------------------------------------------
def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


def test_unreachable_address_fails_fast_naming_it(tmp_path):
    address = f"127.0.0.1:{_closed_port()}"
    tag = uuid.uuid4().hex
    outdir = tmp_path / "out"
    result = _run(_emulate_cmd(outdir, "--tp", "2", "--max-requests", "4",
                               "--address", address), _env(tag))
    assert result.returncode == 2
    line = _error_line(result.stderr, "error: ")
    assert line.startswith(f"error: cannot reach the Ray cluster at {address} within 5 s")
    summary, steps, num_finished = _kept(outdir)
    assert summary["complete"] is False and summary["nodes"] is None
    assert "cannot reach the Ray cluster" in summary["extra"]["error"]
    assert (steps, num_finished) == ([], 0)
    _assert_nothing_left(tag)


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_killed_worker_names_rank_and_node_and_keeps_finished_steps(tmp_path):
    tag = uuid.uuid4().hex
    outdir = tmp_path / "out"
    result = _run(_emulate_cmd(outdir, "--tp", "2", "--max-requests", "10"),
                  _env(tag, EMULATOR_FAULT="kill:rank=1:step=3"))
    assert result.returncode == 1
    line = _error_line(result.stderr, "run failed: ")
    assert re.fullmatch(
        rf"run failed: replica 0 step 3 \(micro-batch 0\): worker rank 1 {NODE} died "
        rf"\(its process exited or its node failed\); kept 3 finished step\(s\) and \d+ "
        rf"finished request\(s\) in {re.escape(str(outdir))} \(summary.json complete=false\)",
        line), line
    summary, steps, num_finished = _kept(outdir)
    assert summary["complete"] is False
    assert steps == [0, 1, 2]  # the three steps that finished before the fault
    assert f"{num_finished} finished request(s)" in line
    assert "worker rank 1" in summary["extra"]["error"]
    node_ids = summary["nodes"]["rank_node_id"]
    assert len(node_ids) == 2 and node_ids[1][:8] in line
    _assert_nothing_left(tag)


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_hung_collective_names_the_rank_that_never_entered(tmp_path):
    tag = uuid.uuid4().hex
    outdir = tmp_path / "out"
    result = _run(_emulate_cmd(outdir, "--tp", "2", "--max-requests", "10"),
                  _env(tag, EMULATOR_FAULT="skip:rank=1:step=2"))
    assert result.returncode == 1
    line = _error_line(result.stderr, "run failed: ")
    assert re.match(rf"run failed: replica 0 step 2 \(micro-batch 0\): rank 1 {NODE} did not "
                    r"enter all_reduce #0 on tp that rank\(s\) \[0\] entered; ", line), line
    assert "collective timeout 3 s; kept 2 finished step(s)" in line
    summary, steps, _ = _kept(outdir)
    assert summary["complete"] is False and steps == [0, 1]
    collectives = pq.read_table(outdir / "collectives.parquet")
    assert sorted(set(collectives["step"].to_numpy().tolist())) == [0, 1]
    _assert_nothing_left(tag)


def _listeners_of(pids: set[int]) -> list[tuple[str, str]]:
    """(local address:port, process name) of the TCP listeners owned by ``pids``."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, timeout=10).stdout
    found = []
    for line in out.splitlines():
        for name, pid in re.findall(r'\("([^"]+)",pid=(\d+)', line):
            if int(pid) in pids:
                found.append((line.split()[3], name))
    return found


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_interrupt_keeps_checkpointed_and_finished_work(tmp_path):
    tag = uuid.uuid4().hex
    outdir = tmp_path / "out"
    cmd = _emulate_cmd(outdir, "--tp", "2", "--max-requests", "40", "--dilation", "3",
                       "--checkpoint-interval-s", "1")
    cmd[1:3] = ["-c", INTERRUPTIBLE]  # instead of -m emulator
    proc = subprocess.Popen(cmd, env=_env(tag), stderr=subprocess.PIPE, text=True,
                            stdout=subprocess.DEVNULL, cwd=REPO)
    try:
        deadline = time.monotonic() + BOUND_S
        while not (outdir / "summary.json").exists():  # the first checkpoint
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        checkpoint = json.loads((outdir / "summary.json").read_text())
        # No dashboard was asked for: no process of the run listens as one.
        listeners = _listeners_of(set(_marked_pids(tag)))
        assert listeners and not [x for x in listeners if "ashboard" in x[1]
                                  or x[0].endswith(":8265")]
        time.sleep(2)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=BOUND_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert checkpoint["complete"] is False
    assert proc.returncode == 130
    line = _error_line(stderr, "interrupted (Ctrl-C): ")
    match = re.fullmatch(r"interrupted \(Ctrl-C\): kept (\d+) finished step\(s\) and (\d+) "
                         rf"finished request\(s\) in {re.escape(str(outdir))} "
                         r"\(summary.json complete=false\)", line)
    assert match, line
    summary, steps, num_finished = _kept(outdir)
    assert summary["complete"] is False
    assert summary["extra"]["error"] == "interrupted (Ctrl-C)"
    assert steps == list(range(int(match[1]))) and len(steps) > 0
    assert num_finished == int(match[2]) < 40
    assert summary["extra"]["control"]["num_checkpoints"] >= 1
    _assert_nothing_left(tag)


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_dashboard_without_its_packages_is_a_clear_error(tmp_path):
    try:
        import aiohttp  # noqa: F401  (a ray[default] dependency of the dashboard)
    except ImportError:
        pass
    else:
        pytest.skip("dashboard packages installed: its 127.0.0.1 binding is checked by hand")
    tag = uuid.uuid4().hex
    result = _run(_emulate_cmd(tmp_path / "out", "--max-requests", "2", "--dashboard"),
                  _env(tag))
    assert result.returncode == 2
    line = _error_line(result.stderr, "error: ")
    assert line.startswith("error: cannot start the Ray dashboard (")
    assert line.endswith("install ray[default] with the same Ray version, or drop --dashboard")
    _assert_nothing_left(tag)
