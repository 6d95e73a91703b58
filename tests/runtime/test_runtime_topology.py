"""Rank topology and process-group order derived from the layout (no Ray, no process group)."""

from __future__ import annotations

from emulator.runtime.groups import axis_groups, rank_topology, stage_ranks
from emulator.runtime.ray_setup import tp_groups
from emulator.specs.layout import ParallelLayout


def test_topology_tp2_pp2_dp2():
    layout = ParallelLayout(dp=2, tp=2, pp=2)
    topo = rank_topology(layout, 5)  # (dp 1, pp 0, tp 1)
    assert (topo.replica, topo.stage, topo.tp_index, topo.world_size) == (1, 0, 1, 8)
    assert topo.tp_ranks == (4, 5)
    assert (topo.prev_stage_rank, topo.next_stage_rank) == (None, 7)
    last = rank_topology(layout, 7)
    assert (last.prev_stage_rank, last.next_stage_rank) == (5, None)
    assert stage_ranks(layout, 1) == [[4, 5], [6, 7]]


def test_axis_groups_match_the_layout():
    layout = ParallelLayout(dp=2, tp=2, pp=2)
    for axis in ("tp", "pp", "dp"):
        assert sorted(axis_groups(layout, axis)) == sorted(layout.groups(axis))
    assert axis_groups(layout, "pp") == [[0, 2], [1, 3], [4, 6], [5, 7]]


def test_tp_groups_for_placement():
    assert tp_groups(ParallelLayout(dp=2, tp=2)) == [[0, 1], [2, 3]]
    assert tp_groups(ParallelLayout(pp=3)) == [[0], [1], [2]]
