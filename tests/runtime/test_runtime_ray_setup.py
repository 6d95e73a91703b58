"""Joining a cluster and reserving placement: errors name the address or the resources."""

from __future__ import annotations

import socket

import pytest
from ray.util import placement_group_table

from emulator.errors import UserError
from emulator.runtime.ray_setup import ClusterUnreachableError, PlacementError, placement, start_ray
from emulator.specs.layout import ParallelLayout


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


def test_unreachable_address_names_it():
    address = f"127.0.0.1:{_closed_port()}"
    with pytest.raises(ClusterUnreachableError, match=f"cannot reach the Ray cluster at {address}"):
        with start_ray(address):
            pass


def test_malformed_address_is_a_user_error():
    with pytest.raises(UserError, match="'head-node' is not HOST:PORT"):
        with start_ray("head-node"):
            pass


@pytest.mark.ray
def test_placement_fails_clearly_when_resources_are_missing(ray_local):
    with pytest.raises(PlacementError, match=r"cannot place 2 ranks as 1 TP group\(s\) of 2"):
        placement(ParallelLayout(tp=2), cpus_per_rank=3.0, timeout_s=1.0)


@pytest.mark.ray
def test_placement_packs_each_tp_group(ray_local):
    reserved = placement(ParallelLayout(dp=2, tp=2), timeout_s=10.0)
    try:
        assert len(reserved.groups) == 2
        assert reserved.bundle_of_rank == {0: (0, 0), 1: (0, 1), 2: (1, 0), 3: (1, 1)}
        tables = [placement_group_table(g) for g in reserved.groups]
        assert [t["strategy"] for t in tables] == ["STRICT_PACK", "STRICT_PACK"]
        assert [len(t["bundles"]) for t in tables] == [2, 2]
    finally:
        reserved.remove()
