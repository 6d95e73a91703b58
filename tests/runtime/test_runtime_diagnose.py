"""Which rank made a step hang, from hand-written collective states (no Ray)."""

from __future__ import annotations

from emulator.runtime.diagnose import describe_stuck, find_missing
from emulator.runtime.records import CollectiveState
from emulator.specs.layout import ParallelLayout

KEY = (0, 7)
AR = ("all_reduce", "tp", 0)


def state(rank, *, tp=(), pp=(), position=0, blocked=False, done=False, error="", key=KEY):
    return CollectiveState(rank=rank, step_key=key, position=position, blocked=blocked,
                           done=done, entered_tp=list(tp), entered_pp=list(pp),
                           ops={p: AR for p in tp}, error=error)


def test_gloo_counter_shift_blames_the_skipper_not_the_last_waiter():
    # rank 1 skipped position 1; gloo paired its later ops with rank 0's, so rank 1
    # finished and rank 0 hangs at its last collective (position 4).
    states = {0: state(0, tp=[0, 1, 2, 3, 4], position=4, blocked=True, error="Timed out"),
              1: state(1, tp=[0, 2, 3, 4], position=5, done=True)}
    assert find_missing(states, ParallelLayout(tp=2), 0, KEY) == [
        (1, "all_reduce #1 on tp (layer 0)", [0])]


def test_a_victim_blocked_earlier_is_not_blamed():
    # tp=2, pp=2: rank 0 skipped position 2 of stage 0; rank 1 is blocked at 2 and so never
    # sent to rank 3, which waits in its recv: only rank 0 is at fault.
    layout = ParallelLayout(tp=2, pp=2)
    states = {0: state(0, tp=[0, 1, 3], pp=[(0, 2)], position=4, done=True),
              1: state(1, tp=[0, 1, 2], position=2, blocked=True, error="Timed out"),
              2: state(2, tp=[1, 2], pp=[(0, 2)], position=3, done=True),
              3: state(3, tp=[], pp=[(1, 3)], position=0, blocked=True, error="Timed out")}
    missing = find_missing(states, layout, 0, KEY)
    assert [rank for rank, _, _ in missing] == [0]


def test_receiver_that_skipped_its_recv_is_named():
    layout = ParallelLayout(pp=2)
    states = {0: state(0, pp=[(0, 1)], position=0, blocked=True, error="Timed out"),
              1: state(1, position=1, done=True)}
    assert find_missing(states, layout, 0, KEY) == [(1, "recv 0->1 on pp", [0])]


def test_rank_still_on_an_older_step_did_not_enter():
    states = {0: state(0, tp=[0], position=0, blocked=True, error="Timed out"),
              1: state(1, tp=[0, 1, 2], position=3, done=True, key=(0, 6))}
    assert find_missing(states, ParallelLayout(tp=2), 0, KEY) == [
        (1, "all_reduce #0 on tp (layer 0)", [0])]


def test_describe_groups_identical_errors():
    states = {0: state(0, tp=[0], position=0, blocked=True,
                       error="[/src/gloo/unbound_buffer.cc:78] Timed out waiting 2000ms"),
              1: state(1, position=0, error="rank 1: bad slot ids")}
    text = describe_stuck(states, ParallelLayout(tp=2), 0, KEY, lambda r: f"rank {r}")
    assert text == ("rank 1 did not enter all_reduce #0 on tp (layer 0) that rank(s) [0] "
                    "entered; rank(s) [0] failed: Timed out waiting 2000ms; "
                    "rank(s) [1] failed: bad slot ids")
