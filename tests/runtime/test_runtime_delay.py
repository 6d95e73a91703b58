"""precise_sleep: never returns before its deadline and reports what it measured."""

from __future__ import annotations

import time

from emulator.runtime.delay import SPIN_S, precise_sleep


def test_precise_sleep_never_returns_early():
    for seconds in (0.0, 50e-6, SPIN_S, 2e-3):
        start = time.perf_counter()
        measured = precise_sleep(seconds)
        outer = time.perf_counter() - start
        assert seconds <= measured <= outer


def test_non_positive_delay_returns_at_once():
    assert precise_sleep(-1.0) < 0.5
