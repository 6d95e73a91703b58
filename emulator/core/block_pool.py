"""Physical KV blocks of one replica: ref counts, the free queue and the prefix-cache map.

Semantics follow vLLM v1 ``vllm/v1/core/block_pool.py``:

- Blocks ``0..N-1`` start in the free queue in id order. (vLLM reserves block 0 as a "null
  block" for sliding-window padding; there is no such block here, all N are usable.)
- ``allocate(n)`` pops the first n blocks of the free queue; ``free(blocks)`` decrements ref
  counts and appends the blocks that reach 0 to the back *in the order given*. The KV manager
  passes a request's blocks tail-first (as vLLM's ``free_blocks(reversed(...))``) so that the
  tail of a sequence, least likely to be shared, is evicted first.
- A full block with a prefix hash is registered in ``hash -> block``. It stays reusable while
  it sits in the free queue; ``touch`` takes it out of the queue (ref count +1) on a prefix
  hit, and when ``allocate`` pops it for reuse its hash entry is evicted.

The free queue is a numpy array with head/tail indices instead of vLLM's linked list, so
allocating or freeing k blocks costs a few numpy calls. Removing a block from the middle
(``touch``) marks its entry stale (``_qpos[block] != entry index``); stale entries are
skipped when popped and dropped when the array is compacted.
"""

from __future__ import annotations

from collections.abc import Hashable

import numpy as np


class BlockPool:
    """N physical blocks; see the module docstring for the free-queue order."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = int(num_blocks)
        self.ref_cnt = np.zeros(num_blocks, np.int32)
        """int32 [N]: number of requests holding each block."""
        cap = 2 * num_blocks + 16
        self._q = np.empty(cap, np.int64)  # free-queue entries, valid ones in [head, tail)
        self._q[:num_blocks] = np.arange(num_blocks)
        self._qpos = np.arange(num_blocks, dtype=np.int64)  # entry index of a free block, else -1
        self._head = 0
        self._tail = num_blocks
        self._num_stale = 0  # invalidated entries in [head, tail)
        self._num_free = num_blocks
        self._is_cached = np.zeros(num_blocks, bool)  # block has a prefix-cache key
        self._hash_of: dict[int, Hashable] = {}  # block -> its prefix-cache key
        self._block_of: dict[Hashable, int] = {}  # prefix-cache key -> block

    # ---- queries -------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks in the free queue (including cached blocks that a prefix hit may reuse)."""
        return self._num_free

    @property
    def num_used(self) -> int:
        """Blocks held by at least one request."""
        return self.num_blocks - self._num_free

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests, 0..1."""
        return self.num_used / self.num_blocks

    @property
    def num_cached(self) -> int:
        """Blocks registered in the prefix cache (held or free)."""
        return len(self._block_of)

    def free_queue_order(self) -> np.ndarray:
        """int64: the free blocks in the order ``allocate`` would pop them."""
        idx = np.arange(self._head, self._tail)
        entries = self._q[self._head:self._tail]
        return entries[self._qpos[entries] == idx].copy()

    def get_cached_block(self, key: Hashable) -> int | None:
        """The block holding prefix-cache ``key`` (held or in the free queue), or None."""
        return self._block_of.get(key)

    def cached_block_hash(self, block: int) -> Hashable | None:
        return self._hash_of.get(int(block))

    # ---- mutators ------------------------------------------------------------------------
    def allocate(self, n: int) -> np.ndarray | None:
        """Pop ``n`` blocks from the front of the free queue (ref count 1), evicting their
        prefix-cache entries; None (and no change) when fewer than ``n`` are free."""
        if n > self._num_free:
            return None
        if n <= 0:
            return np.empty(0, np.int64)
        h = self._head
        if self._num_stale == 0:
            out = self._q[h:h + n].copy()
            self._head = h + n
        else:
            # At most num_stale invalid entries precede the n-th valid one.
            end = min(self._tail, h + n + self._num_stale)
            entries = self._q[h:end]
            valid = np.flatnonzero(self._qpos[entries] == np.arange(h, end))[:n]
            out = entries[valid]
            used = int(valid[-1]) + 1
            self._num_stale -= used - n
            self._head = h + used
        self._qpos[out] = -1
        self.ref_cnt[out] = 1
        self._num_free -= n
        if self._hash_of:
            evicted = out[self._is_cached[out]]
            self._is_cached[evicted] = False
            for b in evicted.tolist():
                del self._block_of[self._hash_of.pop(b)]
        return out

    def free(self, blocks: np.ndarray) -> None:
        """Drop one reference to each block (no duplicates in one call); blocks reaching 0
        are appended to the back of the free queue in the given order."""
        if blocks.size == 0:
            return
        self.ref_cnt[blocks] -= 1
        zero = blocks[self.ref_cnt[blocks] == 0]
        m = zero.size
        if m == 0:
            return
        if self._tail + m > self._q.size:
            self._compact(m)
        t = self._tail
        self._q[t:t + m] = zero
        self._qpos[zero] = np.arange(t, t + m)
        self._tail = t + m
        self._num_free += m

    def touch(self, blocks: np.ndarray) -> None:
        """Add one reference to each block (prefix hit); free ones leave the free queue."""
        if blocks.size == 0:
            return
        in_queue = blocks[self.ref_cnt[blocks] == 0]
        if in_queue.size:
            self._qpos[in_queue] = -1
            self._num_stale += in_queue.size
            self._num_free -= in_queue.size
        self.ref_cnt[blocks] += 1

    def cache_block(self, block: int, key: Hashable) -> bool:
        """Register a full block under ``key``; False (no change) if the key already has a
        block (vLLM keeps the existing one) or the block is already registered."""
        if key in self._block_of or block in self._hash_of:
            return False
        self._block_of[key] = block
        self._hash_of[block] = key
        self._is_cached[block] = True
        return True

    def _compact(self, extra: int) -> None:
        """Move the valid entries to the front (dropping stale ones); grow if needed."""
        valid = self.free_queue_order()
        cap = self._q.size
        while valid.size + extra > cap:
            cap *= 2
        if cap != self._q.size:
            self._q = np.empty(cap, np.int64)
        self._q[:valid.size] = valid
        self._qpos[valid] = np.arange(valid.size)
        self._head, self._tail, self._num_stale = 0, valid.size, 0
