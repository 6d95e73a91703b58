"""Cluster launch files: the launcher YAMLs are valid Ray configs that install this project, and
cluster/local-2node.sh really starts (and stops) a 2-node, token-authenticated Ray cluster.

The cluster is probed from a subprocess so that it never meets a Ray already initialised in
the pytest process; every subprocess has a timeout so that nothing can hang.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
SCRIPT = CLUSTER / "local-2node.sh"
YAMLS = ["onprem.yaml", "aws-gpu.yaml"]
NUM_CPUS_PER_NODE = 2
# Offsets from the base port that local-2node.sh binds (see the table in the script).
FIXED_PORT_OFFSETS = [0, 1, 2, 3, 4, 5, 6, 11, 12, 13, 14, 15, 16]
CANDIDATE_BASE_PORTS = [23190, 24190, 25190, 26190]


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def torch_pin() -> str:
    match = re.search(r'"(torch[^"]*)"', (REPO / "pyproject.toml").read_text())
    assert match, "pyproject.toml has no torch requirement"
    return match.group(1)


@pytest.mark.parametrize("name", YAMLS)
def test_launcher_yaml_has_required_keys(name: str) -> None:
    config = load(name)
    for key in ("cluster_name", "provider", "auth", "file_mounts", "setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in config, f"{name} lacks {key}"
    head = " ".join(config["head_start_ray_commands"])
    worker = " ".join(config["worker_start_ray_commands"])
    assert "ray start --head --port=6379 --dashboard-host=127.0.0.1" in head
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker
    for commands in (head, worker):
        assert "RAY_AUTH_MODE=token" in commands
    # The checkout is copied to every node and installed into the venv, torch pinned as the
    # project pins it; local venvs are never shipped; the token is shipped.
    assert config["file_mounts"]["~/llm-parallel-emulator"] == "."
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert ".venv" in config["rsync_exclude"]
    setup = " ".join(config["setup_commands"])
    assert "pip install -q 'ray[default]==2.60.0' -e ~/llm-parallel-emulator" in setup
    assert f"pip install -q '{torch_pin()}' --index-url" in setup
    assert torch_pin() == "torch>=2.4,<2.14"


def test_yamls_share_setup_commands() -> None:
    assert load("onprem.yaml")["setup_commands"] == load("aws-gpu.yaml")["setup_commands"]


def test_onprem_yaml_is_local_provider_with_marked_placeholders() -> None:
    config = load("onprem.yaml")
    provider = config["provider"]
    assert provider["type"] == "local"
    assert provider["head_ip"] == "FILL_ME_HEAD_IP"
    assert provider["worker_ips"] == ["FILL_ME_WORKER_IP_1", "FILL_ME_WORKER_IP_2"]
    assert config["auth"] == {"ssh_user": "FILL_ME_SSH_USER",
                              "ssh_private_key": "~/.ssh/FILL_ME_KEY"}


def test_aws_yaml_nodes_advertise_their_gpus() -> None:
    config = load("aws-gpu.yaml")
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0, "GPU": 0}
    worker = types["worker.p5"]
    assert worker["node_config"]["InstanceType"] == "p5.48xlarge"
    assert worker["resources"] == {"CPU": 192, "GPU": 8}
    assert worker["min_workers"] == worker["max_workers"] == 2
    assert "NCCL_SOCKET_IFNAME" in " ".join(config["worker_start_ray_commands"])


@pytest.mark.parametrize("name", YAMLS)
def test_launcher_yaml_passes_ray_validation(name: str) -> None:
    """Ray's own defaults filling and JSON-schema check, as `ray up` runs them."""
    pytest.importorskip("jsonschema")
    util = pytest.importorskip("ray.autoscaler._private.util")
    prepared = util.prepare_config(load(name))
    util.validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


def ports_free(base: int) -> bool:
    for offset in FIXED_PORT_OFFSETS:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", base + offset))
            except OSError:
                return False
    return True


PROBE = r"""
import json, sys, time
import ray
ray.init(address=sys.argv[1], log_to_driver=False)
deadline = time.monotonic() + 30
while True:
    alive = [n for n in ray.nodes() if n["Alive"]]
    if len(alive) >= 2 or time.monotonic() > deadline:
        break
    time.sleep(0.5)

@ray.remote(num_cpus=0, resources={"node_b": 0.01})
def node_id():
    return ray.get_runtime_context().get_node_id()

nodes = sorted(
    (json.dumps({k: v for k, v in n["Resources"].items()
                 if k == "CPU" or k.startswith("node_")}, sort_keys=True), n["NodeID"])
    for n in alive)
print(json.dumps({"nodes": [json.loads(r) for r, _ in nodes], "ids": [i for _, i in nodes],
                  "task_node": ray.get(node_id.remote(), timeout=30)}))
"""


def run(args: list[str], env: dict[str, str], timeout_s: float) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout_s,
                          cwd=REPO)


def test_local_two_node_cluster_starts_serves_and_stops() -> None:
    if shutil.which("setsid") is None:
        pytest.skip("setsid (util-linux) not available")
    base = next((p for p in CANDIDATE_BASE_PORTS if ports_free(p)), None)
    if base is None:
        pytest.skip(f"no free port range among bases {CANDIDATE_BASE_PORTS}")
    # Short dir: Ray's Unix socket paths under it must stay below ~107 bytes.
    state_dir = Path(tempfile.mkdtemp(prefix="emu2n-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(EMULATOR_RAY_PORT=str(base), EMULATOR_2NODE_DIR=str(state_dir),
               EMULATOR_NODE_CPUS=str(NUM_CPUS_PER_NODE), EMULATOR_START_TIMEOUT_S="40")
    address = f"127.0.0.1:{base}"
    try:
        start = run([str(SCRIPT), "start"], env, timeout_s=100)
        if start.returncode == 3:
            pytest.skip(f"ports taken: {start.stderr.strip()}")
        assert start.returncode == 0, start.stdout + start.stderr
        assert f"emulator emulate --address {address}" in start.stdout
        assert (state_dir / "env").read_text() == (
            f"export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={state_dir}/auth_token\n")
        assert oct((state_dir / "auth_token").stat().st_mode & 0o777) == "0o600"

        again = run([str(SCRIPT), "start"], env, timeout_s=30)
        assert again.returncode == 0 and "already running" in again.stdout

        with_token = dict(env, RAY_AUTH_MODE="token",
                          RAY_AUTH_TOKEN_PATH=str(state_dir / "auth_token"))
        probe = run([sys.executable, "-c", PROBE, address], with_token, timeout_s=60)
        assert probe.returncode == 0, probe.stderr[-3000:]
        seen = json.loads(probe.stdout.strip().splitlines()[-1])
        assert seen["nodes"] == [{"CPU": float(NUM_CPUS_PER_NODE), "node_a": 1.0},
                                 {"CPU": float(NUM_CPUS_PER_NODE), "node_b": 1.0}]
        # A task asking for node_b's custom resource runs on node b.
        assert seen["task_node"] == seen["ids"][1]

        # Without the token the cluster refuses the driver.
        no_token = run([sys.executable, "-c", PROBE, address], env, timeout_s=60)
        assert no_token.returncode != 0
        assert "ConnectionError: Failed to connect to Ray cluster" in no_token.stderr
    finally:
        pids = [int((state_dir / f"{n}.pid").read_text()) for n in ("a", "b")
                if (state_dir / f"{n}.pid").exists()]
        stop = run([str(SCRIPT), "stop"], env, timeout_s=60)
        status = run([str(SCRIPT), "status"], env, timeout_s=10)
        shutil.rmtree(state_dir, ignore_errors=True)
    assert stop.returncode == 0, stop.stderr
    assert status.stdout == "node_a: stopped\nnode_b: stopped\n"
    assert len(pids) == 2
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)  # the whole process group of each node is gone
