"""Starting or joining Ray, and placing one worker per emulated GPU.

Placement: the TP groups are assigned to nodes by :func:`assign_tp_groups` (round-robin over
the alive nodes that can hold a whole group), then each TP group gets one ``STRICT_PACK``
placement group whose bundles carry a label selector on that node's id (``ray.io/node-id``,
a label every Ray node has). STRICT_PACK alone keeps a TP group on one node, as on a real
deployment (TP peers share NVLink); the explicit assignment also spreads consecutive
pipeline stages and DP replicas over different nodes, so that only PP send/recv crosses the
network. On one node every group simply lands there.

Security (Ray 2.60, checked with ``ss -ltn``): the local Ray started here has no dashboard
unless ``include_dashboard=True`` (then it binds 127.0.0.1). Ray rewrites a loopback node
address to the host's IP and its GCS, raylet and core-worker gRPC servers listen on all
interfaces whatever ``_node_ip_address`` says (ray-project/ray#59852); no Ray 2.60 option
binds them to 127.0.0.1. What keeps other users and hosts out is Ray's token
authentication, on by default for a new local Ray. A driver joining ``HOST:PORT`` sends a
token only with ``RAY_AUTH_MODE=token`` (Ray never auto-enables it for an explicit
address); a refused token is reported as such.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from emulator.errors import UserError

LOCAL_HOST = "127.0.0.1"
CONNECT_TIMEOUT_S = 5.0
"""How long to wait for a TCP connection to a cluster's GCS before giving up (ray.init
alone retries for more than 30 s on an unreachable address)."""
NODE_ID_LABEL = "ray.io/node-id"
"""The label Ray gives every node (its hex id); bundle label selectors pin bundles with it."""
_EPS = 1e-6  # Ray resources are fixed-point with 1e-4 granularity


class ClusterUnreachableError(UserError, ConnectionError):
    """The Ray cluster address given by the user cannot be reached."""


class DashboardError(UserError, RuntimeError):
    """The Ray dashboard was asked for but cannot start."""


class PlacementError(UserError, RuntimeError):
    """The cluster has not got the resources the parallel layout needs."""


class LayoutLike(Protocol):
    """What the runtime needs of ``emulator.specs.layout.ParallelLayout``."""

    dp: int
    tp: int
    pp: int

    def rank_coords(self, rank: int) -> tuple[int, int, int]: ...  # (dp, pp, tp)

    def groups(self, axis: str) -> list[list[int]]: ...


def _check_reachable(address: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ClusterUnreachableError(
            f"Ray address {address!r} is not HOST:PORT; pass 'auto', HOST:PORT of the head's "
            "GCS (e.g. 10.0.0.1:6379), or nothing for a local Ray")
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise ClusterUnreachableError(
            f"cannot reach the Ray cluster at {address} within {CONNECT_TIMEOUT_S:.0f} s "
            f"({exc.strerror or exc}); check the address and that `ray start --head` runs "
            "there") from None


def _join_error(address: str, exc: BaseException) -> ClusterUnreachableError:
    """ray.init's ConnectionError hides the reason in its cause chain (as an exception or
    as the text of one); name it."""
    cause: BaseException | None = exc
    while cause is not None:
        if (type(cause).__name__ == "AuthenticationError"
                or "InvalidAuthToken" in str(cause)):
            mode = os.environ.get("RAY_AUTH_MODE", "unset")
            return ClusterUnreachableError(
                f"the Ray cluster at {address} refused the connection: its token "
                f"authentication failed (RAY_AUTH_MODE={mode}); export RAY_AUTH_MODE=token "
                "and RAY_AUTH_TOKEN_PATH=<the cluster's token file> (cluster/local-2node.sh "
                "writes both to <state dir>/env)")
        cause = cause.__cause__ or cause.__context__
    return ClusterUnreachableError(
        f"cannot join the Ray cluster at {address!r}: {str(exc).splitlines()[0]}")


@contextlib.contextmanager
def start_ray(address: str | None, *, num_cpus: int | None = None,
              include_dashboard: bool = False) -> Iterator[dict[str, Any]]:
    """Start an embedded local Ray (``address=None``) or join a cluster (``"auto"`` or
    ``"HOST:PORT"``) for the duration of the block; yields ``ray.cluster_resources()``.

    The local Ray has no dashboard unless ``include_dashboard`` (bound to 127.0.0.1) and is
    asked to use 127.0.0.1 (``_node_ip_address``); Ray on Linux still replaces a loopback
    node address by the host's primary IP (see the module docstring). If Ray is already
    initialised in this process (e.g. by a test fixture) it is reused and left running on
    exit. An unreachable HOST:PORT fails within CONNECT_TIMEOUT_S, a refused token within
    Ray's ~20 s of retries, both with ClusterUnreachableError naming the address.
    """
    if address not in (None, "auto") and not address.startswith("ray://"):
        _check_reachable(address)
    if ray.is_initialized():
        yield ray.cluster_resources()
        return
    common: dict[str, Any] = dict(include_dashboard=include_dashboard,
                                  logging_level=logging.WARNING, log_to_driver=True,
                                  configure_logging=True)
    if include_dashboard:
        common["dashboard_host"] = LOCAL_HOST
    if address is None:
        try:
            ray.init(num_cpus=num_cpus, _node_ip_address=LOCAL_HOST, **common)
        except Exception as exc:
            if include_dashboard and "dashboard" in str(exc):
                raise DashboardError(
                    f"cannot start the Ray dashboard ({str(exc).splitlines()[0]}); install "
                    "ray[default] with the same Ray version, or drop --dashboard") from None
            raise
    else:
        try:
            ray.init(address=address, **common)
        except ConnectionError as exc:
            raise _join_error(address, exc) from None
    try:
        yield ray.cluster_resources()
    finally:
        ray.shutdown()


# -- placement --------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class NodeInfo:
    """An alive Ray node as placement sees it."""

    node_id: str
    ip: str
    resources: dict[str, float] = field(default_factory=dict)
    """Total resources the node advertises (CPU, GPU, custom)."""


def alive_nodes() -> list[NodeInfo]:
    """Alive nodes, the driver's node first, then by (IP, id) so plans are repeatable."""
    driver = ray.get_runtime_context().get_node_id()
    nodes = [NodeInfo(n["NodeID"], n["NodeManagerAddress"], dict(n.get("Resources", {})))
             for n in ray.nodes() if n.get("Alive")]
    return sorted(nodes, key=lambda n: (n.node_id != driver, n.ip, n.node_id))


def assign_tp_groups(groups: list[list[int]], nodes: list[NodeInfo],
                     bundle: dict[str, float]) -> list[NodeInfo]:
    """The node of each TP group: groups in order (TP groups are ordered by (dp, pp)) go
    round-robin over ``nodes``, each to the next node that still has ``bundle`` x group size
    of every resource; consecutive stages and replicas thus land on different nodes when
    there are several. Raises PlacementError naming the group that fits nowhere."""
    free = [dict(n.resources) for n in nodes]
    out: list[NodeInfo] = []
    start = 0
    for g, ranks in enumerate(groups):
        need = {k: v * len(ranks) for k, v in bundle.items()}
        for i in range(len(nodes)):
            j = (start + i) % len(nodes)
            if all(free[j].get(k, 0.0) + _EPS >= v for k, v in need.items()):
                for k, v in need.items():
                    free[j][k] -= v
                out.append(nodes[j])
                start = j + 1
                break
        else:
            have = "; ".join(f"{n.ip} {n.node_id[:8]} has " + ", ".join(
                f"{k}={free[i].get(k, 0.0):g}" for k in need) + " left"
                for i, n in enumerate(nodes)) or "no alive node"
            raise PlacementError(
                f"{_cannot_place(groups, bundle)}: TP group {g} (ranks {ranks}) needs "
                f"{need} on one node ({have}); lower tp, cpus_per_rank/gpus_per_rank, or "
                "add nodes")
    return out


def _cannot_place(groups: list[list[int]], bundle: dict[str, float]) -> str:
    return (f"the Ray cluster cannot place {sum(map(len, groups))} ranks as {len(groups)} "
            f"TP group(s) of {len(groups[0])} on one node each, {bundle} per rank")


@dataclass(slots=True)
class Placement:
    """Where each rank runs: one STRICT_PACK placement group per TP group, pinned to the
    node :func:`assign_tp_groups` chose."""

    groups: list[PlacementGroup]
    """One placement group per TP group, in the order of ``layout.groups("tp")``."""
    bundle_of_rank: dict[int, tuple[int, int]]
    """rank -> (index into ``groups``, bundle index = TP index)."""
    node_of_group: list[NodeInfo] = field(default_factory=list)
    """The node each placement group is pinned to (empty if unpinned)."""

    def scheduling_strategy(self, rank: int) -> PlacementGroupSchedulingStrategy:
        group_index, bundle_index = self.bundle_of_rank[rank]
        return PlacementGroupSchedulingStrategy(
            placement_group=self.groups[group_index],
            placement_group_bundle_index=bundle_index)

    def node_of_rank(self, rank: int) -> NodeInfo | None:
        return self.node_of_group[self.bundle_of_rank[rank][0]] if self.node_of_group else None

    def remove(self) -> None:
        """Release the reserved resources (idempotent)."""
        for group in self.groups:
            with contextlib.suppress(Exception):
                remove_placement_group(group)
        self.groups = []


def tp_groups(layout: LayoutLike) -> list[list[int]]:
    """TP groups of the layout; each rank alone when tp == 1."""
    if layout.tp > 1:
        return [list(g) for g in layout.groups("tp")]
    world_size = layout.dp * layout.pp * layout.tp
    return [[rank] for rank in range(world_size)]


def placement(layout: LayoutLike, *, cpus_per_rank: float = 0.01, gpus_per_rank: float = 0.0,
              timeout_s: float = 30.0, nodes: list[NodeInfo] | None = None) -> Placement:
    """Reserve one bundle per rank, each TP group packed on the node
    :func:`assign_tp_groups` picks from ``nodes`` (default: the alive nodes); wait up to
    ``timeout_s`` and raise :class:`PlacementError` naming the missing resources.

    ``cpus_per_rank`` is small by default: an emulated GPU mostly sleeps, so many ranks may
    share a core (4 ranks on a 2-core laptop).
    """
    bundle: dict[str, float] = {"CPU": cpus_per_rank}
    if gpus_per_rank > 0:
        bundle["GPU"] = gpus_per_rank
    groups_of_ranks = tp_groups(layout)
    targets = assign_tp_groups(groups_of_ranks, alive_nodes() if nodes is None else nodes,
                               bundle)
    groups: list[PlacementGroup] = []
    bundle_of_rank: dict[int, tuple[int, int]] = {}
    for group_index, (ranks, node) in enumerate(zip(groups_of_ranks, targets)):
        groups.append(placement_group(
            [dict(bundle) for _ in ranks], strategy="STRICT_PACK",
            bundle_label_selector=[{NODE_ID_LABEL: node.node_id} for _ in ranks]))
        for bundle_index, rank in enumerate(ranks):
            bundle_of_rank[rank] = (group_index, bundle_index)
    result = Placement(groups=groups, bundle_of_rank=bundle_of_rank, node_of_group=targets)
    refs = [g.ready() for g in groups]
    ready = set(ray.wait(refs, num_returns=len(refs), timeout=timeout_s)[0])
    if len(ready) < len(refs):
        waiting = sorted({f"{node.ip} {node.node_id[:8]}"
                          for ref, node in zip(refs, targets) if ref not in ready})
        result.remove()
        raise PlacementError(
            f"{_cannot_place(groups_of_ranks, bundle)}, within {timeout_s:.0f} s (still "
            f"waiting on node(s) {', '.join(waiting)}; other jobs may hold their resources; "
            f"cluster has {ray.cluster_resources()}); lower tp, cpus_per_rank/gpus_per_rank, "
            "or add nodes")
    return result
