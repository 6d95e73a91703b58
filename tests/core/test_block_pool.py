"""Block pool: exact block ids and free-queue order on a tiny pool (vLLM's 11-block tests)."""

from __future__ import annotations

import numpy as np

from emulator.core.block_pool import BlockPool


def ids(a) -> list[int]:
    return [int(x) for x in a]


def test_allocate_pops_front_and_free_appends_in_given_order() -> None:
    pool = BlockPool(11)
    a = pool.allocate(3)
    b = pool.allocate(2)
    assert ids(a) == [0, 1, 2] and ids(b) == [3, 4]
    assert ids(pool.free_queue_order()) == [5, 6, 7, 8, 9, 10]
    assert pool.num_free == 6 and pool.num_used == 5 and pool.usage == 5 / 11
    pool.free(a[::-1])  # a request frees tail first
    assert ids(pool.free_queue_order()) == [5, 6, 7, 8, 9, 10, 2, 1, 0]
    c = pool.allocate(7)
    assert ids(c) == [5, 6, 7, 8, 9, 10, 2]
    assert ids(pool.free_queue_order()) == [1, 0]
    assert pool.allocate(3) is None  # running out is a normal result, nothing changes
    assert pool.num_free == 2 and ids(pool.free_queue_order()) == [1, 0]
    assert ids(pool.allocate(0)) == []


def test_shared_block_returns_to_queue_only_at_ref_zero() -> None:
    pool = BlockPool(11)
    a = pool.allocate(2)  # [0, 1]
    pool.touch(a[:1])  # a second holder of block 0
    assert ids(pool.ref_cnt[:2]) == [2, 1]
    pool.free(a[::-1])
    assert ids(pool.free_queue_order()) == [2, 3, 4, 5, 6, 7, 8, 9, 10, 1]
    pool.free(np.array([0]))
    assert ids(pool.free_queue_order())[-2:] == [1, 0]


def test_cached_free_block_is_reusable_until_popped() -> None:
    pool = BlockPool(11)
    x = pool.allocate(4)  # [0, 1, 2, 3]
    assert pool.cache_block(0, "h0") and pool.cache_block(1, "h1")
    assert not pool.cache_block(2, "h0")  # key taken: the first block keeps it
    pool.free(x[::-1])
    assert ids(pool.free_queue_order()) == [4, 5, 6, 7, 8, 9, 10, 3, 2, 1, 0]
    assert pool.get_cached_block("h1") == 1  # still cached while free
    pool.touch(np.array([0]))  # prefix hit on a free block: it leaves the queue
    assert pool.num_free == 10 and pool.ref_cnt[0] == 1
    assert ids(pool.free_queue_order()) == [4, 5, 6, 7, 8, 9, 10, 3, 2, 1]
    y = pool.allocate(10)  # pops the stale entry of block 0 over, evicts h1 when 1 is reused
    assert ids(y) == [4, 5, 6, 7, 8, 9, 10, 3, 2, 1]
    assert pool.get_cached_block("h1") is None and pool.get_cached_block("h0") == 0
    assert pool.num_cached == 1 and pool.num_free == 0


def test_matches_a_list_reference_under_random_operations() -> None:
    """Free-queue order equals a plain-list model of vLLM's queue over many operations
    (covers stale entries and compaction)."""
    rng = np.random.default_rng(7)
    pool = BlockPool(11)
    queue = list(range(11))
    ref = [0] * 11
    held: list[list[int]] = []
    for _ in range(3000):
        op = rng.integers(4)
        if op == 0:
            n = int(rng.integers(0, 5))
            got = pool.allocate(n)
            if n > len(queue):
                assert got is None
                continue
            want, queue = queue[:n], queue[n:]
            for b in want:
                ref[b] = 1
            assert ids(got) == want
            held.append(want)
        elif op == 1 and held:
            blocks = held.pop(int(rng.integers(len(held))))
            pool.free(np.array(blocks[::-1], np.int64))
            for b in blocks[::-1]:
                ref[b] -= 1
                if ref[b] == 0:
                    queue.append(b)
        elif op == 2 and held:
            blocks = held[int(rng.integers(len(held)))][:1]
            pool.touch(np.array(blocks, np.int64))
            for b in blocks:
                if ref[b] == 0:
                    queue.remove(b)
                ref[b] += 1
            held.append(list(blocks))
        elif op == 3 and queue:  # prefix hit on a free cached block: leaves the middle
            b = queue[int(rng.integers(len(queue)))]
            pool.touch(np.array([b], np.int64))
            queue.remove(b)
            ref[b] = 1
            held.append([b])
        assert ids(pool.free_queue_order()) == queue
        assert ids(pool.ref_cnt) == ref and pool.num_free == len(queue)
