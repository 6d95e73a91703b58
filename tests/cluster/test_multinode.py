"""Placement over several nodes: the TP-group-to-node plan (no Ray), then real emulations on
the 2-node Ray cluster of cluster/local-2node.sh (two raylets on this machine).

Checked on the cluster: TP=2 x PP=2 puts each TP group on one node and the two stages on
different nodes; from collectives.parquet, every TP collective stays within one node and
every PP transfer crosses nodes; summary.json names the node of every rank and the clock
offsets applied (0 on the driver's host, where the ping-pong estimate must lie within half a
round trip); a killed rank is reported with its node; no actor or placement group outlives
the run (the cluster's CPUs are all free again).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from test_local_cluster import ports_free

from emulator.runtime.ray_setup import NodeInfo, PlacementError, assign_tp_groups
from emulator.specs.layout import ParallelLayout

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "cluster" / "local-2node.sh"
TRACE = REPO / "traces" / "azure-conv-500.arrow"
NUM_CPUS_PER_NODE = 2
CANDIDATE_BASE_PORTS = [28190, 29190, 30190, 31190]
BOUND_S = 90
"""Upper bound on one CLI run (Ray join, 4 workers, a 10-request trace, teardown)."""


# -- the plan (no Ray) -----------------------------------------------------------------
def _node(name: str, **resources: float) -> NodeInfo:
    return NodeInfo(node_id=name, ip=f"10.0.0.{ord(name[-1]) - 96}", resources=resources)


def _plan(layout: ParallelLayout, nodes: list[NodeInfo], **bundle: float) -> list[str]:
    return [n.node_id for n in assign_tp_groups([list(g) for g in layout.groups("tp")],
                                                nodes, bundle)]


def test_stages_and_replicas_alternate_over_nodes():
    two = [_node("a", CPU=2), _node("b", CPU=2)]
    assert _plan(ParallelLayout(tp=2, pp=2), two, CPU=0.01) == ["a", "b"]
    assert _plan(ParallelLayout(dp=2, tp=2), two, CPU=0.01) == ["a", "b"]
    assert _plan(ParallelLayout(dp=2, tp=2, pp=2), two, CPU=0.01) == ["a", "b", "a", "b"]
    assert _plan(ParallelLayout(tp=2, pp=2), two[:1], CPU=0.01) == ["a", "a"]


def test_groups_skip_nodes_without_room():
    # A CPU-only head and two 8-GPU workers (cluster/aws-gpu.yaml): TP=8 fills a worker.
    nodes = [_node("h", CPU=0), _node("w", CPU=192, GPU=8), _node("x", CPU=192, GPU=8)]
    assert _plan(ParallelLayout(tp=8, pp=2), nodes, CPU=0.01, GPU=1) == ["w", "x"]
    assert _plan(ParallelLayout(dp=2, tp=4, pp=2), nodes, CPU=0.01, GPU=1) == ["w", "x", "w", "x"]
    with pytest.raises(PlacementError, match=(
            r"cannot place 24 ranks as 3 TP group\(s\) of 8 on one node each, .*: TP group 2 "
            r"\(ranks \[16, .*, 23\]\) needs \{'CPU': 0.08, 'GPU': 8\} on one node \(10.0.0.8 "
            r"h has CPU=0, GPU=0 left; 10.0.0.23 w has CPU=191.92, GPU=0 left; ")):
        _plan(ParallelLayout(tp=8, pp=3), nodes, CPU=0.01, GPU=1)


# -- the 2-node cluster ----------------------------------------------------------------
_ports_free = ports_free  # the 2-node script's ports, shared with test_local_cluster


def _run(args: list[str], env: dict[str, str], timeout_s: float) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout_s,
                          cwd=REPO)


@pytest.fixture(scope="module")
def two_nodes():
    """(address, env with the cluster's token) of a running local 2-node cluster."""
    if shutil.which("setsid") is None:
        pytest.skip("setsid (util-linux) not available")
    base = next((p for p in CANDIDATE_BASE_PORTS if _ports_free(p)), None)
    if base is None:
        pytest.skip(f"no free port range among bases {CANDIDATE_BASE_PORTS}")
    state_dir = Path(tempfile.mkdtemp(prefix="emu2n-", dir="/tmp"))  # short: Unix sockets
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RAY_") and k != "EMULATOR_FAULT"}
    env.update(EMULATOR_RAY_PORT=str(base), EMULATOR_2NODE_DIR=str(state_dir),
               EMULATOR_NODE_CPUS=str(NUM_CPUS_PER_NODE), EMULATOR_START_TIMEOUT_S="40")
    try:
        start = _run([str(SCRIPT), "start"], env, timeout_s=100)
        if start.returncode == 3:
            pytest.skip(f"ports taken: {start.stderr.strip()}")
        assert start.returncode == 0, start.stdout + start.stderr
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(state_dir / "auth_token"))
        yield f"127.0.0.1:{base}", env
    finally:
        _run([str(SCRIPT), "stop"], env, timeout_s=60)
        shutil.rmtree(state_dir, ignore_errors=True)


def _emulate(address: str, env: dict[str, str], outdir: Path,
             *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "emulator", "emulate", "--address", address,
           "--trace", str(TRACE), "--model", "tiny", "--hardware", "h100", "--tp", "2",
           "--pp", "2", "--max-requests", "10", "--max-output-tokens", "8", "--timeout-s", "5",
           "-o", str(outdir), *extra]
    return _run(cmd, env, timeout_s=BOUND_S)


PROBE = r"""
import json, sys, time
import ray
ray.init(address=sys.argv[1], log_to_driver=False)
deadline = time.monotonic() + 20
while True:  # the run's actors and placement groups release their CPUs when it ends
    free, total = ray.available_resources().get("CPU", 0), ray.cluster_resources()["CPU"]
    if free == total or time.monotonic() > deadline:
        break
    time.sleep(0.5)
groups = ray.util.placement_group_table().values()
print(json.dumps({"free": free, "total": total,
                  "live_groups": sum(g["state"] != "REMOVED" for g in groups),
                  "nodes": {n["NodeID"]: sorted(k for k in n["Resources"] if k.startswith("node_"))
                            for n in ray.nodes() if n["Alive"]}}))
"""


def _probe(address: str, env: dict[str, str]) -> dict:
    probe = _run([sys.executable, "-c", PROBE, address], env, timeout_s=60)
    assert probe.returncode == 0, probe.stderr[-3000:]
    return json.loads(probe.stdout.strip().splitlines()[-1])


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_tp2_pp2_keeps_tp_on_a_node_and_only_pp_crosses(two_nodes, tmp_path):
    address, env = two_nodes
    outdir = tmp_path / "run"
    result = _emulate(address, env, outdir)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((outdir / "summary.json").read_text())
    assert summary["complete"] is True
    nodes = summary["nodes"]
    node_of = nodes["rank_node_id"]
    assert node_of[0] == node_of[1] and node_of[2] == node_of[3] and node_of[0] != node_of[2]
    assert len(set(nodes["rank_node_ip"])) == 1  # two raylets, one host

    col = pq.read_table(outdir / "collectives.parquet")
    rank = col["rank"].to_numpy()
    axis = col["axis"].to_numpy(zero_copy_only=False)
    key = list(zip(col["replica"].to_numpy().tolist(), col["step"].to_numpy().tolist(),
                   col["group"].to_pylist(), col["seq"].to_numpy().tolist()))
    nodes_of_instance: dict[tuple, set[str]] = {}
    axis_of_instance: dict[tuple, str] = {}
    for k, r, a in zip(key, rank.tolist(), axis.tolist()):
        nodes_of_instance.setdefault(k, set()).add(node_of[r])
        axis_of_instance[k] = a
    crossing = {axis_of_instance[k] for k, n in nodes_of_instance.items() if len(n) > 1}
    local = {axis_of_instance[k] for k, n in nodes_of_instance.items() if len(n) == 1}
    assert crossing == {"pp"} and local == {"tp"}
    pp = [k for k in nodes_of_instance if axis_of_instance[k] == "pp"]
    assert pp and all(len(nodes_of_instance[k]) == 2 for k in pp)  # every send/recv pair
    assert set(rank[axis == "pp"].tolist()) == {0, 1, 2, 3}
    assert np.all(col["transfer_s"].to_numpy() >= 0)

    # One clock entry per node; both share the driver's host, so 0 is applied and the
    # ping-pong estimate (recorded) lies within half its round trip of the truth, 0.
    clocks = {c["node_id"]: c for c in nodes["clocks"]}
    assert set(clocks) == set(node_of)
    for c in clocks.values():
        assert c["offset_s"] == 0.0 and c["source"] == "same host as driver"
        assert abs(c["measured_offset_s"]) <= c["round_trip_s"] / 2
    assert sorted(r for c in clocks.values() for r in c["ranks"]) == [0, 1, 2, 3]

    after = _probe(address, env)
    assert after["free"] == after["total"] == 2 * NUM_CPUS_PER_NODE
    assert after["live_groups"] == 0


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_killed_rank_on_the_second_node_is_named_with_its_node(two_nodes, tmp_path):
    address, env = two_nodes
    outdir = tmp_path / "run"
    result = _emulate(address, dict(env, EMULATOR_FAULT="kill:rank=2:step=2"), outdir)
    assert result.returncode == 1
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("run failed: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    summary = json.loads((outdir / "summary.json").read_text())
    node_b = summary["nodes"]["rank_node_id"][2]
    assert summary["nodes"]["rank_node_id"][0] != node_b
    assert re.search(rf": worker rank 2 \(node \d+\.\d+\.\d+\.\d+ {node_b[:8]}\) died", lines[0])
    assert summary["complete"] is False
    steps = pq.read_table(outdir / "steps.parquet")
    assert len(steps) >= 2 * 2  # at least the 2 finished plans, 2 stages each
    after = _probe(address, env)
    assert after["nodes"][node_b] == ["node_b"]  # the rank that died was on node b
    assert after["free"] == after["total"] and after["live_groups"] == 0


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_driver_without_the_token_is_told_how_to_authenticate(two_nodes, tmp_path):
    address, env = two_nodes
    no_token = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    no_token["RAY_gcs_server_port_wait_time_s"] = "2"  # Ray's retries: 2 s instead of 20
    result = _emulate(address, no_token, tmp_path / "run")
    assert result.returncode == 2
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error: ")]
    assert lines == [
        f"error: the Ray cluster at {address} refused the connection: its token "
        "authentication failed (RAY_AUTH_MODE=unset); export RAY_AUTH_MODE=token and "
        "RAY_AUTH_TOKEN_PATH=<the cluster's token file> (cluster/local-2node.sh writes both "
        "to <state dir>/env)"]
