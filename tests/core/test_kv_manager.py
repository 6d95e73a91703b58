"""KV manager: block tables, slots, bulk decode, prefix reuse and its hit accounting."""

from __future__ import annotations

import numpy as np
import pytest

from emulator.core.kv_manager import KVManager
from emulator.core.requests import RequestTable


def ids(a) -> list[int]:
    return [int(x) for x in a]


def table(prompts, outputs, hashes=None) -> RequestTable:
    n = len(prompts)
    return RequestTable.from_columns([f"r{i}" for i in range(n)], [0.0] * n, prompts, outputs, hashes)


def test_allocate_slots_tables_slots_and_free_order() -> None:
    t = table([40, 10], [30, 5])
    kv = KVManager(11, 16, t)
    for i in range(2):
        kv.register(i)
    assert ids(kv.allocate_slots(0, 40)) == [0, 1, 2]
    assert ids(kv.allocate_slots(1, 10)) == [3]
    assert kv.internal_fragmentation_tokens == (3 * 16 - 40) + (16 - 10)
    assert ids(kv.slot_ids(np.array([0, 1]), np.array([30, 8]), np.array([3, 2]))) == \
        [1 * 16 + 14, 1 * 16 + 15, 2 * 16 + 0, 3 * 16 + 8, 3 * 16 + 9]  # token 30 in block 1
    assert kv.allocate_slots(0, 8 * 16 + 9) is None  # needs 9 blocks, 7 free: no change
    assert kv.num_used_blocks == 4 and ids(kv.block_table(0)) == [0, 1, 2]
    # bulk decode: request 0 at 40 tokens has room, request 1 at 10 has room
    reqs = np.array([0, 1])
    one = np.array([1, 1])
    assert ids(kv.blocks_needed(reqs, one)) == [0, 0]
    kv.allocate_bulk(reqs, np.array([8, 6]), kv.blocks_needed(reqs, np.array([8, 6])))
    assert ids(kv.num_slot_tokens[:2]) == [48, 16]
    assert ids(kv.blocks_needed(reqs, one)) == [1, 1]
    assert ids(kv.allocate_decode_slots(reqs)) == [4, 5]  # handed out in request order
    assert ids(kv.block_table(0)) == [0, 1, 2, 4] and ids(kv.block_table(1)) == [3, 5]
    assert kv.internal_fragmentation_tokens == (4 * 16 - 49) + (2 * 16 - 17)
    kv.allocate_slots(1, 15)  # request 1 fills block 5: 1 free block left
    assert kv.pool.num_free == 5 and kv.allocate_slots(1, 6 * 16) is None
    kv.allocate_slots(0, 15 + 4 * 16)  # request 0 takes 4 more blocks: 1 free
    assert kv.allocate_decode_slots(reqs) is None  # both need a block: all or nothing
    assert kv.pool.num_free == 1 and ids(kv.num_slot_tokens[:2]) == [128, 32]
    kv.free(0)
    assert ids(kv.pool.free_queue_order()) == [10, 9, 8, 7, 6, 4, 2, 1, 0]
    assert kv.num_used_blocks == 2 and kv.internal_fragmentation_tokens == 0


def test_prefix_reuse_at_coarse_hash_granularity() -> None:
    # hash blocks of 32 tokens = 2 physical blocks of 16
    t = table([70, 50, 64], [4, 4, 4], [[111, 222, 333], [111, 999], [111, 222]])
    kv = KVManager(11, 16, t, hash_block_tokens=32)
    for i in range(3):
        kv.register(i)
    assert ids(kv.get_computed_blocks(0)) == []
    assert ids(kv.allocate_slots(0, 70, kv.get_computed_blocks(0))) == [0, 1, 2, 3, 4]
    # full prompt blocks 0..3 are cached under (111,0) (111,1) (222,0) (222,1); block 4 is partial
    assert [kv.pool.cached_block_hash(b) for b in range(5)] == \
        [(111, 0), (111, 1), (222, 0), (222, 1), None]
    hits = kv.get_computed_blocks(1)  # (111,0) (111,1) hit, (999,0) misses
    assert ids(hits) == [0, 1]
    assert ids(kv.allocate_slots(1, 50 - 32, hits)) == [5, 6]
    assert ids(kv.block_table(1)) == [0, 1, 5, 6] and ids(kv.pool.ref_cnt[:2]) == [2, 2]
    assert kv.pool.cached_block_hash(5) == (999, 0)  # tokens 32..47: full, inside the prompt
    assert kv.pool.cached_block_hash(6) is None  # tokens 48..49: partial
    kv.free(0)  # blocks 0, 1 still held by request 1
    assert ids(kv.pool.free_queue_order()) == [7, 8, 9, 10, 4, 3, 2]
    # request 2 knows 64 tokens; the last must be computed, so at most 3 blocks hit
    hits = kv.get_computed_blocks(2)
    assert ids(hits) == [0, 1, 2]
    assert ids(kv.allocate_slots(2, 64 - 48, hits)) == [7]
    assert ids(kv.pool.free_queue_order()) == [8, 9, 10, 4, 3]  # block 2 left the queue
    assert ids(kv.block_table(2)) == [0, 1, 2, 7]
    assert kv.num_prefix_queries == 3
    assert kv.prefix_query_tokens == 70 + 50 + 64
    assert kv.prefix_hit_tokens == 32 + 48


def test_prefix_caching_off_and_bad_granularity() -> None:
    t = table([64, 64], [2, 2], [[1, 2, 3, 4], [1, 2, 3, 4]])
    kv = KVManager(11, 16, t, enable_prefix_caching=False)
    kv.register(0)
    kv.register(1)
    kv.allocate_slots(0, 64, kv.get_computed_blocks(0))
    assert ids(kv.get_computed_blocks(1)) == [] and kv.pool.num_cached == 0
    with pytest.raises(ValueError, match="multiple of block_size"):
        KVManager(11, 16, t, hash_block_tokens=24)
