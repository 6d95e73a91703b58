"""moe.parquet: rows from routing + all-to-all records, sync-wait per instance, and the
optional table round trip through RunWriter / read_run."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from emulator.core.routing import RoutingSpec, route
from emulator.metrics.io import RunWriter, read_run
from emulator.metrics.moe import MoeRecords, RankA2A
from emulator.metrics.records import CollectiveRecords, StepRecords
from emulator.metrics.records import RequestRecords
from emulator.metrics.schema import MOE_SCHEMA

SPEC = RoutingSpec.make(num_experts=8, top_k=2, ep=2, skew="zipf", zipf_s=1.2, seed=4)


def _records() -> MoeRecords:
    moe = MoeRecords()
    # Layer 1: both ranks enter the dispatch at 1.0 / 1.5 and the combine at 3.0 / 2.0.
    ranks = {
        0: RankA2A(0, np.array([1, 1]), np.array([100, 200]), np.array([1.0, 3.0]),
                   np.array([1.6, 3.1])),
        1: RankA2A(0, np.array([1, 1]), np.array([300, 400]), np.array([1.5, 2.0]),
                   np.array([1.6, 3.1])),
    }
    moe.add_step(replica=0, step=7, micro_batch=0, num_tokens=10, routing=SPEC,
                 ep_groups=[[0, 1]], ranks=ranks)
    return moe


def test_rows_join_routing_and_measured_all_to_alls():
    table = _records().to_table()
    assert table.schema.equals(MOE_SCHEMA)
    r = route(SPEC, replica=0, step=7, layer=1, num_tokens=10)
    rows = table.to_pylist()
    assert [row["rank"] for row in rows] == [0, 1]
    for i, row in enumerate(rows):
        assert row["tokens_out"] == r.dispatch[i].sum() and row["tokens_in"] == r.dispatch[:, i].sum()
        assert row["tokens_per_expert"] == r.slot_tokens[4 * i:4 * i + 4].tolist()
        assert row["slot_experts"] == list(range(4 * i, 4 * i + 4))
        assert row["imbalance"] == r.imbalance
    assert [row["a2a_bytes_sent"] for row in rows] == [300, 700]
    assert [row["dispatch_sync_wait_s"] for row in rows] == [0.5, 0.0]
    assert [row["combine_sync_wait_s"] for row in rows] == [0.0, 1.0]
    assert [row["a2a_sync_wait_s"] for row in rows] == [0.5, 1.0]


def test_a_layer_needs_dispatch_and_combine():
    bad = {0: RankA2A(0, np.array([1]), np.array([1]), np.array([0.0]), np.array([1.0]))}
    with pytest.raises(ValueError, match="exactly two"):
        MoeRecords().add_step(replica=0, step=0, micro_batch=0, num_tokens=4, routing=SPEC,
                              ep_groups=[[0, 1]], ranks=bad)


def test_moe_table_round_trip(tmp_path):
    req = RequestRecords.from_arrays(
        request_id=["a"], replica=[0], arrival_s=[0.0], first_token_s=[1.0], finish_s=[2.0],
        prompt_tokens=[4], output_tokens=[2], num_preemptions=[0])
    steps = StepRecords()
    steps.append(0, 0, 0, 0.0, 1.0, 1, 4, 0, 0.5, 0.5, 1, 10)
    steps.append(0, 1, 0, 1.0, 2.0, 1, 0, 1, 0.5, 0.5, 1, 10)
    writer = RunWriter(tmp_path / "run", timeline=False)
    writer.finish(requests=req, steps=steps, collectives=CollectiveRecords(), mode="emulate",
                  config={"model": "tiny-moe"}, moe=_records())
    run = read_run(tmp_path / "run")
    assert run.moe is not None and run.moe.num_rows == 2
    assert run.moe.column("tokens_in").to_pylist() == _records().to_table().column(
        "tokens_in").to_pylist()
    # A later run without EP removes the stale table.
    writer.finish(requests=req, steps=steps, mode="simulate", config={})
    assert read_run(tmp_path / "run").moe is None
    assert not (tmp_path / "run" / "moe.parquet").exists()
    assert isinstance(run.moe, pa.Table)
