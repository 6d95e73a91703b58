"""The rank's feed thread (runtime.feed): order, outcomes, errors, re-entry."""

import threading

import pytest

from emulator.runtime.feed import Feed


def test_posted_items_run_in_order_and_their_outcomes_come_out_in_order():
    started = threading.Event()
    release = threading.Event()
    ran: list[int] = []
    feed = Feed()

    def first():
        started.set()
        release.wait(5)
        ran.append(0)
        return "a"

    feed.post(first)
    assert started.wait(5)
    feed.post(lambda: ran.append(1) or "b")
    # run() queues behind both posted items (it waits for them)
    result: list[object] = []
    waiter = threading.Thread(target=lambda: result.append(feed.run(lambda: list(ran))))
    waiter.start()
    waiter.join(0.05)
    assert waiter.is_alive() and ran == []
    release.set()
    waiter.join(5)
    assert result == [[0, 1]]
    assert (feed.take(), feed.take()) == ("a", "b")  # run()'s outcome is not among them
    feed.stop()


def test_an_item_that_raises_hands_its_exception_to_the_caller_and_the_feed_goes_on():
    feed = Feed()
    feed.post(lambda: 1 // 0)
    feed.post(lambda: "after")
    with pytest.raises(ZeroDivisionError):
        feed.take()
    assert feed.take() == "after"
    with pytest.raises(KeyError, match="x"):
        feed.run(lambda: {}["x"])
    assert feed.run(lambda: 7) == 7
    feed.stop()


def test_run_on_the_feed_thread_runs_inline_instead_of_waiting_for_itself():
    feed = Feed()
    assert feed.run(lambda: feed.run(lambda: threading.current_thread().name)) == "rank-feed"
    feed.stop()


def test_on_start_runs_on_the_thread_and_stop_ends_it():
    names: list[str] = []
    feed = Feed(on_start=lambda: names.append(threading.current_thread().name), name="f")
    assert feed.run(lambda: names[:]) == ["f"]
    feed.stop()
    feed._thread.join(5)
    assert not feed.alive
