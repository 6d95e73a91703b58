"""Starting or joining Ray, and placing one worker per emulated GPU.

Placement choice: one ``STRICT_PACK`` placement group per TP group (``tp`` bundles, bundle
``i`` = TP index ``i``). STRICT_PACK forces a TP group onto one node, as on a real
deployment (TP peers share NVLink), while different TP groups (other pipeline stages, other
DP replicas) may land on any node. A single PACK group over all ranks would only *prefer*
co-location; bundle label selectors would need node labels the user has to set up.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from emulator.errors import UserError

LOCAL_HOST = "127.0.0.1"
CONNECT_TIMEOUT_S = 5.0
"""How long to wait for a TCP connection to a cluster's GCS before giving up (ray.init
alone retries for more than 30 s on an unreachable address)."""


class ClusterUnreachableError(UserError, ConnectionError):
    """The Ray cluster address given by the user cannot be reached."""


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


@contextlib.contextmanager
def start_ray(address: str | None, *, num_cpus: int | None = None) -> Iterator[dict[str, Any]]:
    """Start an embedded local Ray (``address=None``) or join a cluster (``"auto"`` or
    ``"HOST:PORT"``) for the duration of the block; yields ``ray.cluster_resources()``.

    The local Ray has no dashboard and is asked to use 127.0.0.1 (``_node_ip_address``);
    note that Ray on Linux replaces a loopback node address by the host's primary IP
    (``ray._private.services.resolve_ip_for_localhost``), so the node is reported under
    that IP. If Ray is already initialised in this process (e.g. by a test fixture) it is
    reused and left running on exit. An unreachable HOST:PORT fails within
    CONNECT_TIMEOUT_S with ClusterUnreachableError naming the address.
    """
    if address not in (None, "auto") and not address.startswith("ray://"):
        _check_reachable(address)
    if ray.is_initialized():
        yield ray.cluster_resources()
        return
    common = dict(include_dashboard=False, logging_level=logging.WARNING,
                  log_to_driver=True, configure_logging=True)
    if address is None:
        ray.init(num_cpus=num_cpus, _node_ip_address=LOCAL_HOST, **common)
    else:
        try:
            ray.init(address=address, **common)
        except ConnectionError as exc:
            raise ClusterUnreachableError(
                f"cannot join the Ray cluster at {address!r}: {str(exc).splitlines()[0]}"
            ) from None
    try:
        yield ray.cluster_resources()
    finally:
        ray.shutdown()


@dataclass(slots=True)
class Placement:
    """Where each rank runs: one STRICT_PACK placement group per TP group."""

    groups: list[PlacementGroup]
    """One placement group per TP group, in the order of ``layout.groups("tp")``."""
    bundle_of_rank: dict[int, tuple[int, int]]
    """rank -> (index into ``groups``, bundle index = TP index)."""

    def scheduling_strategy(self, rank: int) -> PlacementGroupSchedulingStrategy:
        group_index, bundle_index = self.bundle_of_rank[rank]
        return PlacementGroupSchedulingStrategy(
            placement_group=self.groups[group_index],
            placement_group_bundle_index=bundle_index)

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
              timeout_s: float = 30.0) -> Placement:
    """Reserve one bundle per rank, each TP group packed on one node; wait up to
    ``timeout_s`` and raise :class:`PlacementError` naming the missing resources.

    ``cpus_per_rank`` is small by default: an emulated GPU mostly sleeps, so many ranks may
    share a core (4 ranks on a 2-core laptop).
    """
    bundle: dict[str, float] = {"CPU": cpus_per_rank}
    if gpus_per_rank > 0:
        bundle["GPU"] = gpus_per_rank
    groups: list[PlacementGroup] = []
    bundle_of_rank: dict[int, tuple[int, int]] = {}
    for group_index, ranks in enumerate(tp_groups(layout)):
        groups.append(placement_group([dict(bundle) for _ in ranks], strategy="STRICT_PACK"))
        for bundle_index, rank in enumerate(ranks):
            bundle_of_rank[rank] = (group_index, bundle_index)
    result = Placement(groups=groups, bundle_of_rank=bundle_of_rank)
    ready, _ = ray.wait([g.ready() for g in groups], num_returns=len(groups), timeout=timeout_s)
    if len(ready) < len(groups):
        result.remove()
        group_size = len(tp_groups(layout)[0])
        raise PlacementError(
            f"the Ray cluster cannot place {len(bundle_of_rank)} ranks as {len(groups)} "
            f"TP group(s) of {group_size} on one node each, {bundle} per rank, within "
            f"{timeout_s:.0f} s (cluster has {ray.cluster_resources()}); lower tp, "
            "cpus_per_rank/gpus_per_rank, or add nodes")
    return result
