"""Per-MoE-layer expert-parallel metrics: the ``moe.parquet`` table (schema.MOE_COLUMNS).

One row per (replica, step, EP layer, rank). Token counts come from the routing
(core.routing.route, the seeded definition the workers fed to ``all_to_all_single``); bytes
and sync-wait come from the ranks' measured all-to-all records: on every rank an EP layer
runs exactly two all-to-alls, dispatch then combine, so the k-th all-to-all of a layer is
the same instance on every member. ``sync_wait = max(entry over the group) - own entry``
(DESIGN section 3): in the combine it is the time a rank waits for the most loaded rank's
experts, i.e. the imbalance made real.

The simulator's view of the same quantities is :meth:`emulator.cost.CostModel.moe_load`
(expected imbalance, busiest and mean expert time) — :func:`predicted_sync_wait_s` turns it
into the predicted mean combine sync-wait.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from emulator.core.routing import RoutingSpec, route
from emulator.metrics.schema import MOE_COLUMNS, MOE_SCHEMA


@dataclass(slots=True)
class RankA2A:
    """One rank's all-to-all records of one step (times already in target seconds)."""

    stage: int
    layer: np.ndarray
    """int [C]: layer of each all-to-all, in call order (two per EP layer)."""
    bytes: np.ndarray
    """int [C]: bytes sent to other ranks."""
    entry_s: np.ndarray
    exit_s: np.ndarray


class MoeRecords:
    """Accumulates moe rows step by step; ``to_table()`` gives the Arrow table."""

    __slots__ = ("_rows",)
    _NAMES = tuple(c[0] for c in MOE_COLUMNS)

    def __init__(self) -> None:
        self._rows: list[tuple] = []

    def __len__(self) -> int:
        return len(self._rows)

    def add_step(self, *, replica: int, step: int, micro_batch: int, num_tokens: int,
                 routing: RoutingSpec, ep_groups: list[list[int]],
                 ranks: dict[int, RankA2A]) -> None:
        """Rows of one step: ``ranks`` maps each rank that ran all-to-alls to its records;
        ``ep_groups`` are the layout's EP groups (layout.groups('ep'))."""
        spr = routing.slots_per_rank
        done: set[tuple[int, int]] = set()
        for rank, rec in ranks.items():
            group = next(g for g in ep_groups if rank in g)
            for layer in dict.fromkeys(rec.layer.tolist()):
                if (group[0], layer) in done:
                    continue
                done.add((group[0], layer))
                lr = route(routing, replica=replica, step=step, layer=layer,
                           num_tokens=num_tokens)
                members = [r for r in group if r in ranks]
                entries = {r: _layer_calls(ranks[r], layer) for r in members}
                max_entry = [max(e[k][0] for e in entries.values()) for k in (0, 1)]
                imbalance = lr.imbalance
                for r in members:
                    i = group.index(r)
                    (d_entry, d_bytes), (c_entry, c_bytes) = entries[r]
                    d_wait, c_wait = max_entry[0] - d_entry, max_entry[1] - c_entry
                    self._rows.append((
                        replica, step, micro_batch, ranks[r].stage, layer, r, i, num_tokens,
                        int(lr.dispatch[i].sum()), int(lr.dispatch[:, i].sum()),
                        routing.slot_expert[i * spr:(i + 1) * spr].tolist(),
                        lr.slot_tokens[i * spr:(i + 1) * spr].tolist(), imbalance,
                        d_bytes + c_bytes, d_wait, c_wait, d_wait + c_wait))

    def to_table(self) -> pa.Table:
        cols = list(zip(*self._rows)) if self._rows else [()] * len(self._NAMES)
        arrays = [pa.array(list(col), type=f.type) for col, f in zip(cols, MOE_SCHEMA)]
        return pa.Table.from_arrays(arrays, schema=MOE_SCHEMA)


def _layer_calls(rec: RankA2A, layer: int) -> tuple[tuple[float, int], tuple[float, int]]:
    """((entry, bytes) of the dispatch, (entry, bytes) of the combine) of ``layer``."""
    idx = np.flatnonzero(rec.layer == layer)
    if idx.size != 2:
        raise ValueError(f"layer {layer} has {idx.size} all-to-all records on a rank; an EP "
                         "layer runs exactly two (dispatch, combine)")
    return ((float(rec.entry_s[idx[0]]), int(rec.bytes[idx[0]])),
            (float(rec.entry_s[idx[1]]), int(rec.bytes[idx[1]])))


def predicted_sync_wait_s(busiest_expert_s: float, mean_expert_s: float) -> float:
    """Predicted mean (over ranks) combine sync-wait of one EP layer: ranks enter the
    dispatch together (identical work before it) and the combine when their own experts
    finish, so a rank waits busiest - own, whose mean is busiest - mean."""
    return busiest_expert_s - mean_expert_s
