"""A rank's own work thread: everything that touches its memory or its collectives runs
there, one item at a time, in the order the driver's calls arrived.

Why a thread of its own: Ray takes about a millisecond on this kind of host between the end
of one actor call and the start of the next one already queued (its reply, the next
call's dispatch; `benchmarks/bench_emulator.py` times a bare actor). When a rank ran its
steps inside the Ray calls, that gap fell between every two steps of a run that keeps the
next plan queued. With the feed, a call only posts the step (:meth:`Feed.post`) and
returns; the thread starts the next step as soon as the one before ends, and a second call
(:meth:`Feed.take`, in its own concurrency group) waits for the step's outcome. The worker
also keeps the payload's unpickling and the records' making and pickling off this thread
(Worker.post_step, Worker.step_result): on the development VM, TP=2 decode steps then
followed each other after 0.08 ms (median) instead of ~1 ms.

Calls that must finish before the caller goes on (allocation, the host mode, teardown, the
fault hook, ...) go through :meth:`Feed.run`: queued behind the posted steps, so they keep
the order they had when they shared one thread with the steps.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable


class _Waiter:
    """The outcome of one :meth:`Feed.run` item, handed from the feed thread to the caller."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._outcome: tuple[bool, Any] = (True, None)

    def set(self, outcome: tuple[bool, Any]) -> None:
        self._outcome = outcome
        self._done.set()

    def wait(self) -> Any:
        self._done.wait()
        ok, value = self._outcome
        if ok:
            return value
        raise value


class Feed:
    """One daemon thread running posted callables in order. ``on_start`` runs first on the
    thread (e.g. selecting its CUDA device, which is per thread)."""

    def __init__(self, on_start: Callable[[], None] | None = None,
                 name: str = "rank-feed") -> None:
        self._items: queue.SimpleQueue = queue.SimpleQueue()
        self._outcomes: queue.SimpleQueue = queue.SimpleQueue()
        self._on_start = on_start
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def post(self, fn: Callable[[], Any]) -> None:
        """Queue ``fn``; its return value or exception is the next one :meth:`take` gives
        (outcomes of posted items come out in posting order)."""
        self._items.put((fn, None))

    def take(self) -> Any:
        """The outcome of the oldest posted item not yet taken: its return value, or its
        exception raised here. Blocks until that item has run."""
        ok, value = self._outcomes.get()
        if ok:
            return value
        raise value

    def run(self, fn: Callable[[], Any]) -> Any:
        """Queue ``fn`` behind the items already posted, wait for it and return its value
        (or raise its exception). Its outcome does not go to :meth:`take`. Called on the
        feed thread itself (an item that calls another such method), ``fn`` runs at once:
        queued, it would wait for the item that waits for it."""
        if threading.current_thread() is self._thread:
            return fn()
        waiter = _Waiter()
        self._items.put((fn, waiter))
        return waiter.wait()

    def stop(self) -> None:
        """End the thread after the items queued so far (no wait)."""
        self._items.put(None)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _loop(self) -> None:
        if self._on_start is not None:
            self._on_start()
        while True:
            item = self._items.get()
            if item is None:
                return
            fn, waiter = item
            try:
                outcome = (True, fn())
            except BaseException as exc:  # handed to the caller, raised there
                outcome = (False, exc)
            if waiter is None:
                self._outcomes.put(outcome)
            else:
                waiter.set(outcome)
