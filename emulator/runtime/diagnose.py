"""Name the rank(s) that made a step hang, from every rank's CollectiveState.

Why positions and not counters: gloo matches collectives by a per-group counter, so when a
rank skips one all-reduce its *next* all-reduce pairs with its peers' skipped one, and the
hang shows up later (often at the last collective of the step), on the wrong ranks. The
program position of each entered collective keeps the truth: the first position of a TP
group that some member entered and another did not is where they diverged.

A member "legitimately" lacks a collective when it is blocked in an earlier collective of
its own program (it is a victim waiting for someone else); otherwise (it skipped it, is
still computing, or finished without it) it is reported as not having entered it.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from emulator.runtime.groups import stage_ranks
from emulator.runtime.ray_setup import LayoutLike
from emulator.runtime.records import CollectiveState

_AFTER_EVERYTHING = 1 << 62


def _entered_tp(state: CollectiveState, step_key: object) -> set[int]:
    return set(state.entered_tp) if state.step_key == step_key else set()


def _entered_pp(state: CollectiveState, step_key: object) -> set[tuple[int, int]]:
    return set(state.entered_pp) if state.step_key == step_key else set()


def _waits_earlier(state: CollectiveState, step_key: object, position: int) -> bool:
    """True if the rank is (or failed while) blocked in a collective before ``position``."""
    return state.step_key == step_key and state.blocked and state.position < position


def find_missing(states: dict[int, CollectiveState], layout: LayoutLike, replica: int,
                 step_key: object) -> list[tuple[int, str, list[int]]]:
    """[(rank that did not enter, what it missed, ranks that entered it)], first
    divergence per TP group plus every pipeline transfer entered by one side only."""
    found: list[tuple[int, str, list[int]]] = []
    stages = stage_ranks(layout, replica)
    for group in stages:
        entered = {r: _entered_tp(states[r], step_key) for r in group}
        for position in sorted(set().union(*entered.values())):
            missing = [r for r in group if position not in entered[r]
                       and not _waits_earlier(states[r], step_key, position)]
            if missing:
                holders = [r for r in group if position in entered[r]]
                op, axis, layer = states[holders[0]].ops[position]
                what = f"{op} #{position} on {axis}" + (f" (layer {layer})" if layer >= 0 else "")
                found.extend((r, what, holders) for r in missing)
                break
    for s in range(1, len(stages)):
        for src, dst in zip(stages[s - 1], stages[s]):
            edge = (src, dst)
            has = {r: edge in _entered_pp(states[r], step_key) for r in edge}
            if has[src] == has[dst]:
                continue
            lacking, holder = (dst, src) if has[src] else (src, dst)
            # a send is the sender's last collective, a recv the receiver's first one
            position = _AFTER_EVERYTHING if lacking == src else 0
            if not _waits_earlier(states[lacking], step_key, position):
                op = "send" if lacking == src else "recv"
                found.append((lacking, f"{op} {src}->{dst} on pp", [holder]))
    return found


def describe_stuck(states: dict[int, CollectiveState], layout: LayoutLike, replica: int,
                   step_key: object, where: Callable[[int], str]) -> str:
    """One line: who did not enter what, then which ranks failed and how."""
    parts = [f"{where(rank)} did not enter {what} that rank(s) {holders} entered"
             for rank, what, holders in find_missing(states, layout, replica, step_key)]
    by_error: dict[str, list[int]] = {}
    for r, s in sorted(states.items()):
        if s.step_key == step_key and s.error:
            by_error.setdefault(_short_error(s.error), []).append(r)
    parts.extend(f"rank(s) {ranks} failed: {error}" for error, ranks in by_error.items())
    hung = [r for r, s in sorted(states.items())
            if s.step_key == step_key and s.blocked and not s.error]
    if hung:
        parts.append(f"rank(s) {hung} still blocked in a collective")
    return "; ".join(parts) or "the step failed without a collective error"


def _short_error(error: str) -> str:
    """Drop gloo's source-location prefix and our own "rank N: " prefix, so that ranks
    failing the same way are listed once."""
    error = re.sub(r"^\[[^\]]*\] ", "", error)
    return re.sub(r"^rank \d+( \(stage \d+\))?: ", "", error)
