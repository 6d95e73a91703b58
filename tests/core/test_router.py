"""Router policies: exact picks and lowest-index tie-breaks."""

from __future__ import annotations

import pytest

from emulator.core import RequestTable, Router, Scheduler, SchedulerConfig
from emulator.errors import ConfigError


def test_round_robin_cycles() -> None:
    r = Router("round_robin", 3)
    assert [r.route(i) for i in range(7)] == [0, 1, 2, 0, 1, 2, 0]


def test_least_outstanding_ties_to_lowest_index() -> None:
    r = Router("least_outstanding", 4)
    assert r.route(0, num_outstanding=[3, 1, 1, 2]) == 1
    assert r.route(1, num_outstanding=[0, 0, 0, 0]) == 0
    with pytest.raises(ValueError, match="needs num_outstanding"):
        r.route(2)


def test_least_kv_then_outstanding_then_index() -> None:
    r = Router("least_kv", 3)
    assert r.route(0, num_outstanding=[0, 0, 0], kv_usage=[0.5, 0.2, 0.3]) == 1
    assert r.route(1, num_outstanding=[2, 1, 1], kv_usage=[0.0, 0.0, 0.0]) == 1
    assert r.route(2, num_outstanding=[1, 1, 1], kv_usage=[0.1, 0.0, 0.0]) == 1


def test_route_to_schedulers_spreads_a_burst() -> None:
    t = RequestTable.from_columns([f"r{i}" for i in range(5)], [0.0] * 5, [10] * 5, [5] * 5)
    scheds = [Scheduler(SchedulerConfig(), 50, t, replica=k) for k in range(2)]
    r = Router("least_kv", 2)
    picks = []
    for i in range(5):
        k = r.route_to(i, scheds)
        scheds[k].add_request(i, 0.0)
        picks.append(k)
    assert picks == [0, 1, 0, 1, 0]
    assert t.replica.tolist() == picks


def test_bad_policy() -> None:
    with pytest.raises(ConfigError, match="round_robin"):
        Router("random", 2)  # type: ignore[arg-type]
