"""Joining the per-rank rows of one collective *instance* (one call on all its members).

How instances are keyed
-----------------------
An instance is identified by ``(replica, step, group, seq)``:

- ``group`` names the communicator and is the same string on every member: a TP/EP/PP
  subgroup (e.g. ``"tp/dp0/pp1"``), or, for point-to-point transfers, the *link* between
  the two ranks (e.g. ``"pp/dp0/tp0/0>1"``); a send and its matching recv name the same link.
- ``seq`` is the per-rank counter of ops this rank issued on ``group`` within
  ``(replica, step)``, starting at 0. gloo and NCCL require the members of a communicator
  to issue its ops in the same order, so the k-th op on a group is the same call on every
  member; for a link, the k-th send on one side is the k-th recv on the other.

The runtime fills ``group`` and ``seq``; this module checks that the members of every
instance agree (same op, or exactly one send + one recv; same layer) and raises
``ValueError`` naming the instance if they do not, since that means mis-numbered records.

From the members' entry times (DESIGN section 3):
``sync_wait_s = max(entry) - own entry`` (waiting for stragglers) and
``transfer_s = own exit - max(entry)``. An instance with only some of its ranks recorded
(a run that failed mid-step) is joined over the ranks present.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from emulator.metrics.schema import OPS

# Ops as integer codes; send and recv share one "kind" so a p2p pair is one instance.
_OP_CODE = {op: i for i, op in enumerate(OPS)}
_SEND, _RECV = _OP_CODE["send"], _OP_CODE["recv"]


def _codes(values: np.ndarray) -> np.ndarray:
    """Integer codes of a string column (order irrelevant: only equality is used)."""
    if len(values) == 0:
        return np.empty(0, dtype=np.int64)
    enc = pa.array(values, type=pa.string()).dictionary_encode()
    return enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)


def _group_rows(replica, step, group_code, seq) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sort rows so each instance is one contiguous run: (order, run starts, instance index
    of each sorted row)."""
    n = len(group_code)
    order = np.lexsort((seq, group_code, step, replica))
    change = np.zeros(n, dtype=bool)
    change[:1] = True
    for k in (replica, step, group_code, seq):
        k = np.asarray(k)[order]
        change[1:] |= k[1:] != k[:-1]
    return order, np.flatnonzero(change), np.cumsum(change) - 1


def instance_ids(*, replica: np.ndarray, step: np.ndarray, group: np.ndarray,
                 seq: np.ndarray) -> np.ndarray:
    """int64 per row: an id shared by exactly the rows of one collective instance."""
    if len(seq) == 0:
        return np.empty(0, dtype=np.int64)
    order, _, inst_sorted = _group_rows(replica, step, _codes(group), seq)
    ids = np.empty(len(order), dtype=np.int64)
    ids[order] = inst_sorted
    return ids


def compute_sync_transfer(*, replica: np.ndarray, step: np.ndarray, group: np.ndarray,
                          seq: np.ndarray, op: np.ndarray, layer: np.ndarray,
                          entry_s: np.ndarray, exit_s: np.ndarray
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(sync_wait_s, transfer_s)`` per row, float64, in input order.

    ``group`` and ``op`` are string arrays; the others numeric, all of one length.
    """
    n = len(entry_s)
    if n == 0:
        return np.empty(0), np.empty(0)
    entry_s = np.asarray(entry_s, dtype=np.float64)
    exit_s = np.asarray(exit_s, dtype=np.float64)
    group_code = _codes(group)
    op_code = np.array([_OP_CODE[o] for o in np.asarray(op).tolist()], dtype=np.int64)

    order, starts, inst_sorted = _group_rows(replica, step, group_code, seq)
    keys = [np.asarray(k)[order] for k in (replica, step, group_code, seq)]
    _check_members(order, starts, keys, group, op_code[order], np.asarray(layer)[order])

    max_entry = np.maximum.reduceat(entry_s[order], starts)
    max_entry_row = np.empty(n, dtype=np.float64)
    max_entry_row[order] = max_entry[inst_sorted]
    return max_entry_row - entry_s, exit_s - max_entry_row


def _check_members(order: np.ndarray, starts: np.ndarray, keys: list[np.ndarray],
                   group: np.ndarray, op_sorted: np.ndarray, layer_sorted: np.ndarray) -> None:
    is_send = op_sorted == _SEND
    is_recv = op_sorted == _RECV
    is_p2p = is_send | is_recv
    kind = np.where(is_p2p, _SEND, op_sorted)  # send and recv are one kind
    sizes = np.diff(np.append(starts, len(order)))
    bad = (np.minimum.reduceat(kind, starts) != np.maximum.reduceat(kind, starts))
    bad |= np.minimum.reduceat(layer_sorted, starts) != np.maximum.reduceat(layer_sorted, starts)
    p2p = np.add.reduceat(is_p2p.astype(np.int64), starts) > 0
    bad |= p2p & ((sizes > 2)
                  | (np.add.reduceat(is_send.astype(np.int64), starts) > 1)
                  | (np.add.reduceat(is_recv.astype(np.int64), starts) > 1))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        s = starts[i]
        rows = order[s:s + sizes[i]]
        raise ValueError(
            f"collective instance (replica={keys[0][s]}, step={keys[1][s]}, "
            f"group={group[rows[0]]!r}, seq={keys[3][s]}) "
            f"at input rows {rows.tolist()[:8]} mixes ops or layers, or is a send/recv with "
            "more than one send and one recv; the runtime must number `seq` per group so the "
            "k-th op on a group is the same call on every member")
