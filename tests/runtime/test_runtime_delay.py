"""precise_sleep, and compute delays timed from the end of the previous op."""

from __future__ import annotations

import time

import pytest

from emulator.runtime.delay import SPIN_S, precise_sleep


def test_precise_sleep_never_returns_early():
    for seconds in (0.0, 50e-6, SPIN_S, 2e-3):
        start = time.perf_counter()
        measured = precise_sleep(seconds)
        outer = time.perf_counter() - start
        assert seconds <= measured <= outer


def test_non_positive_delay_returns_at_once():
    assert precise_sleep(-1.0) < 0.5


class FakeClock:
    """A clock that only moves when told to (or when a delay waits on it)."""

    def __init__(self) -> None:
        self.t = 10.0
        self.waits: list[float] = []

    def __call__(self) -> float:
        return self.t

    def delay(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.t += seconds + 1e-6  # a delay ends a microsecond late


def timed(clock: FakeClock):
    import torch

    from emulator.runtime.groups import TimedCollectives

    coll = TimedCollectives(0, {}, torch.device("cpu"), clock, lambda: None, clock.delay)
    coll.begin_step(("step", 0))
    return coll


def compute_rows(coll) -> list[tuple[int, int, float, float]]:
    """(kind, layer, start_s, end_s) of the compute delays recorded so far."""
    rec = coll.recorder.freeze(rank=0, stage=0, step_key=None, start_s=0.0, end_s=0.0,
                               num_tokens=0, num_sampled_tokens=0, num_kv_rows_written=0)
    return [(int(k), int(layer), float(a), float(b)) for k, layer, a, b in
            zip(rec.comp_kind, rec.comp_layer, rec.comp_start_s, rec.comp_end_s)]


def test_compute_delay_runs_from_the_previous_ops_end():
    # The bookkeeping between two ops (here 3 us) runs inside the delay: it waits out only
    # what is left of it and is recorded from the previous op's end.
    clock = FakeClock()
    coll = timed(clock)
    coll.compute(1, 0, 100e-6)
    clock.t += 3e-6
    coll.settle()
    assert clock.waits == [pytest.approx(97e-6)]
    (kind, layer, start, end), = compute_rows(coll)
    assert (kind, layer, start) == (1, 0, 10.0)
    assert end == pytest.approx(10.0 + 101e-6)
    assert coll.ready_s == end
    coll.settle()  # nothing pending: no second wait, no second record
    assert len(clock.waits) == 1 and len(compute_rows(coll)) == 1


def test_consecutive_delays_chain_and_a_late_delay_is_not_stretched():
    clock = FakeClock()
    coll = timed(clock)
    coll.compute(1, 0, 50e-6)
    coll.compute(2, 0, 20e-6)  # waits out the first, then starts at its end
    clock.t += 30e-6  # later than the second delay's deadline
    coll.settle()
    first, second = compute_rows(coll)
    assert first[2:] == (10.0, pytest.approx(10.0 + 51e-6))
    # Late: recorded up to its deadline; the 11 us after it stay outside (overhead).
    assert second[2:] == (first[3], pytest.approx(first[3] + 20e-6))
    assert len(clock.waits) == 1
    assert coll.ready_s == pytest.approx(first[3] + 30e-6)


def test_end_step_waits_out_the_last_delay():
    clock = FakeClock()
    coll = timed(clock)
    coll.compute(3, -1, 1e-3)
    coll.end_step()
    assert clock.waits == [pytest.approx(1e-3)]
    assert coll.state().done
