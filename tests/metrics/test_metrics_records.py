"""Record buffers: schemas match DESIGN section 7, collective instances are joined exactly."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from emulator.metrics.records import CollectiveRecords, RequestRecords, StepRecords
from emulator.metrics.schema import (COLLECTIVES_SCHEMA, REQUESTS_SCHEMA, SCHEMA_VERSION,
                                     STEPS_SCHEMA)

# Copied from DESIGN.md section 7: the contract. Extra columns come after, listed here too.
DESIGN_REQUESTS = ["request_id", "replica", "arrival_s", "first_token_s", "finish_s", "ttft_s",
                   "tpot_s", "e2e_s", "prompt_tokens", "output_tokens", "num_preemptions"]
DESIGN_STEPS = ["replica", "step", "stage", "start_s", "end_s", "num_requests",
                "num_prefill_tokens", "num_decode_tokens", "compute_s", "comm_s",
                "kv_blocks_used", "kv_blocks_total"]
DESIGN_COLLECTIVES = ["replica", "step", "stage", "layer", "rank", "axis", "op", "bytes",
                      "entry_s", "exit_s", "sync_wait_s", "transfer_s"]


@pytest.mark.parametrize("schema, design, extra", [
    (REQUESTS_SCHEMA, DESIGN_REQUESTS, []),
    (STEPS_SCHEMA, DESIGN_STEPS, ["micro_batch"]),
    (COLLECTIVES_SCHEMA, DESIGN_COLLECTIVES, ["micro_batch", "group", "seq"]),
])
def test_schema_names_are_the_design_contract(schema, design, extra):
    assert schema.names == design + extra
    assert schema.metadata[b"emulator.schema_version"] == SCHEMA_VERSION.encode()
    assert all(f.metadata and f.metadata[b"description"] for f in schema)


def _step_row(step, **kw):
    row = dict(replica=1, step=step, stage=0, start_s=float(step), end_s=step + 0.5,
               num_requests=2, num_prefill_tokens=16, num_decode_tokens=1, compute_s=0.25,
               comm_s=0.125, kv_blocks_used=3 + step, kv_blocks_total=11)
    row.update(kw)
    return row


def test_steps_append_and_extend_keep_order_and_types():
    rec = StepRecords()
    rec.append(**_step_row(0))
    rec.extend(replica=1, step=np.array([1, 2]), stage=0, start_s=np.array([1.0, 2.0]),
               end_s=np.array([1.5, 2.5]), num_requests=np.array([2, 2]), num_prefill_tokens=0,
               num_decode_tokens=np.array([2, 2]), compute_s=np.array([0.25, 0.25]),
               comm_s=np.array([0.0, 0.0]), kv_blocks_used=np.array([4, 5]),
               kv_blocks_total=11, micro_batch=np.array([0, 1]))
    rec.append(**_step_row(3), micro_batch=1)
    assert len(rec) == 4
    table = rec.to_table()
    assert table.schema.equals(STEPS_SCHEMA)
    assert table.column("step").to_pylist() == [0, 1, 2, 3]
    assert table.column("micro_batch").to_pylist() == [0, 0, 1, 1]
    assert table.column("kv_blocks_used").to_pylist() == [3, 4, 5, 6]
    assert table.column("replica").to_pylist() == [1, 1, 1, 1]
    assert table.column("num_prefill_tokens").to_pylist() == [16, 0, 0, 16]


def test_steps_empty_table_has_schema():
    table = StepRecords().to_table()
    assert table.num_rows == 0 and table.schema.equals(STEPS_SCHEMA)


@pytest.mark.parametrize("change, message", [
    ({"step": np.array([1.5, 2.5])}, "cannot hold"),
    ({"step": np.array([1, 2, 3])}, "differ in length"),
    ({"bogus": np.array([1, 2])}, "unknown columns"),
])
def test_steps_extend_rejects_bad_columns(change, message):
    cols = {k: np.array([v, v]) for k, v in _step_row(0).items()}
    cols.update(change)
    with pytest.raises(ValueError, match=message):
        StepRecords().extend(**cols)


def test_steps_extend_requires_every_contract_column():
    cols = {k: np.array([v]) for k, v in _step_row(0).items() if k != "comm_s"}
    with pytest.raises(ValueError, match="missing columns \\['comm_s'\\]"):
        StepRecords().extend(**cols)


def _coll(**cols):
    base = dict(replica=0, step=0, stage=0, layer=0, axis="tp", op="all_reduce", group="tp/dp0",
                seq=0, bytes=4096)
    base.update(cols)
    return base


def test_two_rank_all_reduce_sync_wait_and_transfer():
    rec = CollectiveRecords()
    # rank 1 arrives late: rank 0 waits 0.5 s for it; both leave after the transfer.
    rec.extend(_coll(rank=np.array([0, 1]), entry_s=np.array([1.0, 1.5]),
                     exit_s=np.array([3.0, 3.25])))
    table = rec.finalize()
    assert table.schema.equals(COLLECTIVES_SCHEMA)
    assert table.column("sync_wait_s").to_pylist() == [0.5, 0.0]
    assert table.column("transfer_s").to_pylist() == [1.5, 1.75]


def test_instances_are_keyed_by_replica_step_group_seq_in_any_row_order():
    rec = CollectiveRecords()
    # Rank rows arrive per rank (as the runtime ships them), instances interleaved.
    rec.extend(_coll(rank=0, seq=np.array([0, 1]), entry_s=np.array([1.0, 5.0]),
                     exit_s=np.array([2.0, 6.0])))
    rec.extend(_coll(rank=1, seq=np.array([0, 1]), entry_s=np.array([1.25, 4.0]),
                     exit_s=np.array([2.0, 6.0])))
    # Same group and seq on another replica and another step: separate instances.
    rec.extend(_coll(replica=1, rank=2, entry_s=np.array([9.0]), exit_s=np.array([9.5])))
    rec.extend(_coll(step=1, rank=0, entry_s=np.array([7.0]), exit_s=np.array([7.5])))
    table = rec.to_table()
    assert table.column("sync_wait_s").to_pylist() == [0.25, 0.0, 0.0, 1.0, 0.0, 0.0]
    assert table.column("transfer_s").to_pylist() == [0.75, 1.0, 0.75, 1.0, 0.5, 0.5]


def test_send_recv_pair_is_one_instance_of_two_ranks():
    rec = CollectiveRecords()
    # Stage 1 posts its recv at 1.0 and waits for stage 0's send at 2.0.
    rec.extend(dict(replica=0, step=0, stage=np.array([0, 1]), layer=-1,
                    rank=np.array([0, 1]), axis="pp", op=np.array(["send", "recv"], object),
                    group="pp/dp0/tp0/0>1", seq=0, bytes=8192,
                    entry_s=np.array([2.0, 1.0]), exit_s=np.array([2.25, 2.5])))
    # Stage 1 forwards on the next link: its own instance, not joined with the first.
    rec.extend(dict(replica=0, step=0, stage=np.array([1, 2]), layer=-1,
                    rank=np.array([1, 2]), axis="pp", op=np.array(["send", "recv"], object),
                    group="pp/dp0/tp0/1>2", seq=0, bytes=8192,
                    entry_s=np.array([3.0, 0.5]), exit_s=np.array([3.5, 3.5])))
    table = rec.finalize()
    assert table.column("sync_wait_s").to_pylist() == [0.0, 1.0, 0.0, 2.5]
    assert table.column("transfer_s").to_pylist() == [0.25, 0.5, 0.5, 0.5]


@pytest.mark.parametrize("op, layer", [
    (["send", "send"], [-1, -1]),           # a p2p instance needs one send and one recv
    (["all_reduce", "all_gather"], [0, 0]),  # members disagree on the op
    (["all_reduce", "all_reduce"], [0, 1]),  # members disagree on the layer
])
def test_misnumbered_instances_are_rejected(op, layer):
    rec = CollectiveRecords()
    rec.extend(_coll(rank=np.array([0, 1]), op=np.array(op, object), layer=np.array(layer),
                     entry_s=np.array([0.0, 0.0]), exit_s=np.array([1.0, 1.0])))
    with pytest.raises(ValueError, match="group='tp/dp0', seq=0"):
        rec.finalize()


def test_collectives_reject_unknown_axis_and_op():
    with pytest.raises(ValueError, match="column 'axis' has values \\['xy'\\]"):
        CollectiveRecords().extend(_coll(axis="xy", rank=np.array([0]), entry_s=np.array([0.0]),
                                         exit_s=np.array([1.0])))
    with pytest.raises(ValueError, match="column 'op' has values \\['allreduce'\\]"):
        CollectiveRecords().extend(_coll(op="allreduce", rank=np.array([0]),
                                         entry_s=np.array([0.0]), exit_s=np.array([1.0])))


def test_empty_collectives_table():
    table = CollectiveRecords().finalize()
    assert table.num_rows == 0 and table.schema.equals(COLLECTIVES_SCHEMA)


def test_requests_from_arrays_derives_latencies():
    rec = RequestRecords.from_arrays(
        request_id=["a", "b", "c", "d"], replica=[0, 1, 0, 1],
        arrival_s=[0.0, 1.0, 2.0, 3.0], first_token_s=[1.0, 1.5, 4.0, math.nan],
        finish_s=[5.0, 3.5, 4.0, math.nan], prompt_tokens=[10, 20, 30, 40],
        output_tokens=[5, 5, 1, 8], num_preemptions=[0, 2, 1, 0])
    table = rec.to_table()
    assert table.schema.equals(REQUESTS_SCHEMA)
    assert len(rec) == 4
    assert table.column("ttft_s").to_pylist()[:3] == [1.0, 0.5, 2.0]
    assert table.column("e2e_s").to_pylist()[:3] == [5.0, 2.5, 2.0]
    tpot = table.column("tpot_s").to_pylist()
    assert tpot[:2] == [1.0, 0.5]
    assert math.isnan(tpot[2])  # one output token: no inter-token time
    assert math.isnan(tpot[3]) and math.isnan(table.column("ttft_s").to_pylist()[3])
    assert table.column("request_id").type == pa.string()


def test_requests_from_arrays_rejects_ragged_columns():
    with pytest.raises(ValueError, match="differ in length"):
        RequestRecords.from_arrays(request_id=["a"], replica=[0, 0], arrival_s=[0.0],
                                   first_token_s=[1.0], finish_s=[2.0], prompt_tokens=[1],
                                   output_tokens=[2], num_preemptions=[0])
