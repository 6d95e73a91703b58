"""WorkerGroup on a local Ray with gloo: what crosses the wire per step, KV rows, failures.

Per rank and per step, with L layers on the rank's stage, T tokens, hidden h, bf16 (2 B):
  stage 0:     1 embedding all-reduce + 2 all-reduces per layer, each T*h*2 bytes on tp
  last stage:  2 all-reduces per layer + 1 logits all-gather of sampled*vocab/tp*2 bytes
  stage s < last: 1 send of T*h*2 bytes to the next stage; stage s > 0: 1 recv of as many
(tp == 1 has no TP collectives; pp == 1 has no send/recv).
"""

from __future__ import annotations

import numpy as np
import pytest
import ray
from work_builders import step_work

from emulator.errors import RunError
from emulator.runtime.cluster import WorkerGroup
from emulator.runtime.records import AXES, NO_LAYER, OPS
from emulator.specs.layout import ParallelLayout

pytestmark = [pytest.mark.ray, pytest.mark.timeout(120)]

T, H, VOCAB, L = 6, 64, 1000, 3
ACT_BYTES = T * H * 2


@pytest.fixture(scope="module")
def tp2_pp2(ray_local):
    with WorkerGroup(ParallelLayout(tp=2, pp=2), backend="gloo", timeout_s=10) as group:
        yield group


def _ops(records) -> list[tuple[str, str, int, int]]:
    return [(OPS[o], AXES[a], int(layer), int(b)) for o, a, layer, b in
            zip(records.coll_op, records.coll_axis, records.coll_layer, records.coll_bytes)]


def test_tp2_pp2_collectives_per_rank(tp2_pp2):
    work = step_work(tp=2, pp=2, num_layers_per_stage=L, num_tokens=T, hidden=H, vocab=VOCAB)
    records = tp2_pp2.run_replica_step(0, work, None, 1.0, step_key=0)
    assert [r.rank for r in records] == [0, 1, 2, 3]
    assert [r.stage for r in records] == [0, 0, 1, 1]
    layer_pairs = [("all_reduce", "tp", layer, ACT_BYTES) for layer in range(L) for _ in (0, 1)]
    for r in records[:2]:  # stage 0: layers 0..2
        assert _ops(r) == ([("all_reduce", "tp", NO_LAYER, ACT_BYTES)] + layer_pairs
                           + [("send", "pp", NO_LAYER, ACT_BYTES)])
        assert r.count("all_reduce", "tp") == 2 * L + 1
    stage1_pairs = [("all_reduce", "tp", L + layer, ACT_BYTES)
                    for layer in range(L) for _ in (0, 1)]
    gather_bytes = T * VOCAB // 2 * 2
    for r in records[2:]:  # stage 1: layers 3..5
        assert _ops(r) == ([("recv", "pp", NO_LAYER, ACT_BYTES)] + stage1_pairs
                           + [("all_gather", "tp", NO_LAYER, gather_bytes)])
    # send/recv pair the same TP index across stages
    assert [int(r.coll_peer[-1]) for r in records[:2]] == [2, 3]
    assert [int(r.coll_peer[0]) for r in records[2:]] == [0, 1]
    for r in records:
        assert np.all(r.coll_exit_s >= r.coll_entry_s)
        assert r.start_s <= r.coll_entry_s.min() and r.coll_exit_s.max() <= r.end_s
        # compute records: pre/post + 2 per layer, each actually slept
        assert len(r.comp_kind) == 2 * L + 1
        assert r.compute_s == pytest.approx(float((r.comp_end_s - r.comp_start_s).sum()))
        assert r.compute_s >= (2 * L + 1) * 1e-4


def test_tp2_pp2_stage1_receives_after_stage0_sends(tp2_pp2):
    work = step_work(tp=2, pp=2, num_layers_per_stage=L, num_tokens=T, hidden=H)
    records = tp2_pp2.run_replica_step(0, work, None, 1.0, step_key=1)
    for sender, receiver in ((records[0], records[2]), (records[1], records[3])):
        # a recv cannot complete before the matching send was called (same host clock)
        assert receiver.coll_exit_s[0] >= sender.coll_entry_s[-1]


def test_steps_in_flight_run_in_submission_order(tp2_pp2):
    # The emulation loop keeps several micro-batches of a replica in flight; every rank
    # must run them in the order they were submitted (stage 1 of step k overlaps stage 0
    # of step k+1).
    work = step_work(tp=2, pp=2, num_layers_per_stage=1, num_tokens=T, hidden=H)
    pending = [tp2_pp2.submit_replica_step(0, work, None, 1.0, step_key=("mb", k))
               for k in range(6)]
    records = [tp2_pp2.collect(p) for p in pending]
    assert [rs[0].step_key for rs in records] == [(0, ("mb", k)) for k in range(6)]
    for rank in range(4):
        starts = [rs[rank].start_s for rs in records]
        ends = [rs[rank].end_s for rs in records]
        assert all(e <= s for e, s in zip(ends, starts[1:]))


def test_kv_rows_in_use_equal_slots_written(tp2_pp2):
    block_size = 4
    tp2_pp2.allocate([(128, 64), (64,)], kv_num_blocks=8, kv_block_elems=block_size * 100,
                     memory_scale=0.5, kv_block_size_tokens=block_size)
    work = step_work(tp=2, pp=2, num_layers_per_stage=1, num_tokens=T, hidden=H)
    # blocks 2 and 5: 4 + 2 slots this step, then 6 more tokens reusing two of them
    slots = np.array([8, 9, 10, 11, 20, 21])
    tp2_pp2.run_replica_step(0, work, slots, 1.0, step_key=2)
    assert tp2_pp2.kv_rows_in_use() == [6, 6, 6, 6]
    tp2_pp2.run_replica_step(0, work, np.array([20, 21, 22, 23, 4, 5]), 1.0, step_key=3)
    assert tp2_pp2.kv_rows_in_use() == [10, 10, 10, 10]
    tp2_pp2.free_kv_blocks(0, np.array([5]), kv_block_size_tokens=block_size)  # 20..23
    assert tp2_pp2.kv_rows_in_use() == [6, 6, 6, 6]
    # frees that ride with a plan are released before it writes: block 2 (8..11) goes,
    # 24..29 come
    tp2_pp2.collect(tp2_pp2.submit_replica_step(
        0, work, np.arange(24, 30), 1.0, step_key=4,
        freed_blocks=(np.array([2]), block_size)))
    assert tp2_pp2.kv_rows_in_use() == [8, 8, 8, 8]


def test_clock_offset_on_one_host_is_within_half_a_round_trip(tp2_pp2):
    # same CLOCK_MONOTONIC: the worker's reading lies between the driver's two readings
    offset_s, round_trip_s = tp2_pp2.measure_clock_offset(3, num_samples=4)
    assert abs(offset_s) <= round_trip_s / 2
    assert set(tp2_pp2.clock_offset_s.values()) == {0.0}
    assert len(set(tp2_pp2.node_of_rank())) == 1


def test_allocate_reports_exact_bytes(tp2_pp2):
    reports = tp2_pp2.allocate([(128, 64), (3, 5)], kv_num_blocks=8, kv_block_elems=16 * 10,
                               memory_scale=0.25, kv_block_size_tokens=16)
    for r in reports:
        assert r.weight_bytes_represented == (128 * 64 + 15) * 2
        assert r.weight_bytes_allocated == (2048 + 4) * 2  # round(8192/4), round(15/4)
        assert r.kv_bytes_represented == 8 * 160 * 2
        assert r.kv_num_rows == 8 * 16
        assert r.kv_bytes_allocated == 8 * 16 * 2 * 2  # row = round(160 * 0.25 / 16) = 2
    per_stage = tp2_pp2.allocate([], kv_num_blocks=1, kv_block_elems=16, memory_scale=1.0,
                                 stage_weight_shapes=[[(10,)], [(20,), (2, 2)]])
    assert [r.weight_bytes_allocated for r in per_stage] == [20, 20, 48, 48]


def test_dp2_replicas_are_independent(ray_local):
    layout = ParallelLayout(dp=2, tp=2)
    work = step_work(tp=2, pp=1, num_layers_per_stage=2, num_tokens=T, hidden=H)
    with WorkerGroup(layout, backend="gloo", timeout_s=5) as group:
        # replica 1 alone: would time out if it needed replica 0's ranks
        alone = group.run_replica_step(1, work, None, 1.0, step_key=0)
        assert [r.rank for r in alone] == [2, 3]
        both = [group.submit_replica_step(rep, work, None, 1.0, step_key=1) for rep in (0, 1)]
        records = [r for pending in both for r in group.collect(pending)]
    assert [r.rank for r in records] == [0, 1, 2, 3]
    for r in records:
        assert set(AXES[a] for a in r.coll_axis) == {"tp"}
        assert np.all(r.coll_peer == -1)
        assert r.count("all_reduce") == 2 * 2 + 1 and r.count("all_gather") == 1


def test_skipped_collective_names_the_rank(ray_local):
    work = step_work(tp=2, pp=1, num_layers_per_stage=2, num_tokens=T, hidden=H)
    with WorkerGroup(ParallelLayout(tp=2), backend="gloo", timeout_s=2) as group:
        group.run_replica_step(0, work, None, 1.0, step_key=0)
        group.skip_next_collective(1)
        with pytest.raises(RunError) as info:
            group.run_replica_step(0, work, None, 1.0, step_key=1)
    message = str(info.value)
    assert "rank 1 (node" in message
    assert "did not enter all_reduce #0 on tp that rank(s) [0] entered" in message
    assert "rank 0 (node" not in message


def test_killed_actor_names_the_rank(ray_local):
    work = step_work(tp=2, pp=1, num_layers_per_stage=1, num_tokens=T, hidden=H)
    with WorkerGroup(ParallelLayout(tp=2), backend="gloo", timeout_s=3) as group:
        group.run_replica_step(0, work, None, 1.0, step_key=0)
        ray.kill(group.actors[1])
        with pytest.raises(RunError, match=r"worker rank 1 \(node .*\) died"):
            group.run_replica_step(0, work, None, 1.0, step_key=1)


def test_bad_work_is_reported_with_the_rank(tp2_pp2):
    work = step_work(tp=2, pp=2, num_layers_per_stage=1, num_tokens=T, hidden=H)
    with pytest.raises(RunError, match=r"rank\(s\) \[0, 1, 2, 3\] failed: 5 slot ids for 6 tokens"):
        tp2_pp2.run_replica_step(0, work, np.arange(5), 1.0, step_key=9)
