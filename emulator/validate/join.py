"""Joining an emulated run with its simulation, one row per (replica, step, stage).

Both runs drive the same scheduler, so when plan contents do not depend on timing (an
offline batch trace and pp == 1: every plan is formed when the previous one ends) the two
step tables hold the same plans. With arrivals over time, or with PP (plans formed while
others are in flight), a timing difference can change which requests a plan holds; then
the runs are not comparable step by step. The join checks every joined row's plan
(requests, prefill and decode tokens) and the key sets, and raises
:class:`ValidationJoinError` naming the first mismatch instead of comparing unlike steps.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from emulator.errors import UserError

KEY = ("replica", "step", "stage")
PLAN = ("num_requests", "num_prefill_tokens", "num_decode_tokens")


class ValidationJoinError(UserError, ValueError):
    """The emulated and simulated runs did not execute the same plans."""


def _cols(table: pa.Table, names) -> dict[str, np.ndarray]:
    return {n: table[n].to_numpy() for n in names}


def join_steps(measured: pa.Table, predicted: pa.Table) -> dict[str, np.ndarray]:
    """Rows of both step tables matched one to one on (replica, step, stage); returns the key
    and plan columns plus ``measured_s`` / ``predicted_s`` (end - start of each row),
    ``measured_start_s`` and ``predicted_start_s``, sorted by key."""
    names = KEY + PLAN + ("start_s", "end_s")
    m, p = _cols(measured, names), _cols(predicted, names)
    out: dict[str, np.ndarray] = {}
    order = {}
    for label, t in (("emulated", m), ("simulated", p)):
        o = np.lexsort(tuple(t[k] for k in reversed(KEY)))
        keys = np.stack([t[k][o] for k in KEY], axis=1)
        dup = np.flatnonzero((np.diff(keys, axis=0) == 0).all(axis=1))
        if dup.size:
            raise ValidationJoinError(f"{label} steps table has (replica, step, stage) = "
                                      f"{tuple(keys[dup[0]].tolist())} twice")
        order[label] = (o, keys)
    (om, km), (op, kp) = order["emulated"], order["simulated"]
    if km.shape != kp.shape or not (km == kp).all():
        only_m = set(map(tuple, km.tolist())) - set(map(tuple, kp.tolist()))
        only_p = set(map(tuple, kp.tolist())) - set(map(tuple, km.tolist()))
        which = (f"emulated only: {sorted(only_m)[:3]}" if only_m
                 else f"simulated only: {sorted(only_p)[:3]}")
        raise ValidationJoinError(
            f"the runs have different steps ({len(km)} emulated, {len(kp)} simulated rows; "
            f"{which}): plans diverged; validate with an offline batch trace "
            "(`emulator trace synth --arrival batch`)")
    for name in PLAN:
        a, b = m[name][om], p[name][op]
        bad = np.flatnonzero(a != b)
        if bad.size:
            i = bad[0]
            raise ValidationJoinError(
                f"step (replica, step, stage) = {tuple(km[i].tolist())}: {name} is {a[i]} "
                f"emulated but {b[i]} simulated ({bad.size} of {a.size} rows differ): plans "
                "diverged because timing changed the scheduler's choices; validate with an "
                "offline batch trace (`emulator trace synth --arrival batch`)")
    for k, col in zip(KEY, km.T):
        out[k] = col
    for name in PLAN:
        out[name] = m[name][om]
    out["measured_s"] = m["end_s"][om] - m["start_s"][om]
    out["predicted_s"] = p["end_s"][op] - p["start_s"][op]
    out["measured_start_s"] = m["start_s"][om]
    out["predicted_start_s"] = p["start_s"][op]
    return out
