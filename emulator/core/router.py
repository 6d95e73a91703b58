"""Assignment of arriving requests to DP replicas.

Each replica has its own scheduler and KV pool; nothing is pooled across replicas, so a
replica that saturates its KV cache preempts even while others have room (the "capacity
trap"). Pure and deterministic: ties go to the lowest replica index.

- ``round_robin``: replicas in turn, ignoring their state.
- ``least_outstanding``: fewest requests routed and not finished (running + waiting).
- ``least_kv``: lowest KV usage; ties (e.g. all idle at start, when usage is 0 everywhere)
  broken by fewest outstanding requests, then by index, so a burst of arrivals still spreads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np

from emulator.errors import ConfigError

if TYPE_CHECKING:
    from emulator.core.scheduler import Scheduler

RouterPolicy = Literal["round_robin", "least_outstanding", "least_kv"]
_POLICIES = ("round_robin", "least_outstanding", "least_kv")


class Router:
    """Picks a replica per request; see the module docstring for the policies."""

    def __init__(self, policy: RouterPolicy, num_replicas: int) -> None:
        if policy not in _POLICIES:
            raise ConfigError(f"router={policy!r} is not one of {', '.join(_POLICIES)}")
        if num_replicas < 1:
            raise ConfigError(f"num_replicas={num_replicas} must be >= 1")
        self.policy = policy
        self.num_replicas = num_replicas
        self._next = 0  # round-robin cursor

    def route(self, idx: int, *, num_outstanding: Sequence[int] | np.ndarray | None = None,
              kv_usage: Sequence[float] | np.ndarray | None = None) -> int:
        """Replica for request ``idx`` given each replica's state (``num_outstanding`` for
        least_outstanding and least_kv, ``kv_usage`` 0..1 for least_kv)."""
        n = self.num_replicas
        if self.policy == "round_robin":
            rep = self._next
            self._next = (rep + 1) % n
            return rep
        if num_outstanding is None or len(num_outstanding) != n:
            raise ValueError(f"route({idx}): policy {self.policy} needs num_outstanding for {n} replicas")
        outstanding = np.asarray(num_outstanding, dtype=np.int64)
        if self.policy == "least_outstanding":
            return int(np.argmin(outstanding))  # argmin returns the first minimum
        if kv_usage is None or len(kv_usage) != n:
            raise ValueError(f"route({idx}): policy least_kv needs kv_usage for {n} replicas")
        # lexsort: last key is primary; the stable sort leaves equal keys in index order.
        return int(np.lexsort((outstanding, np.asarray(kv_usage, dtype=np.float64)))[0])

    def route_to(self, idx: int, schedulers: Sequence[Scheduler]) -> int:
        """:meth:`route` reading the state of one scheduler per replica."""
        if self.num_replicas == 1:  # every policy picks replica 0 (the cursor stays 0)
            return 0
        if self.policy == "round_robin":
            return self.route(idx)
        return self.route(idx, num_outstanding=[s.num_outstanding for s in schedulers],
                          kv_usage=[s.kv_usage for s in schedulers])
