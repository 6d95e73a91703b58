"""Per-request block tables over one replica's :class:`BlockPool` (vLLM v1
``kv_cache_manager.py`` semantics), stored as numpy columns so that a decode step over
thousands of running requests is a handful of vectorized operations.

Block tables live in one flat int64 array: each request gets a region of
``ceil((prompt + output - 1) / block_size)`` entries (its largest possible table) when it is
registered with this replica, so appending a block is a single indexed write and a bulk
append for many requests is one fancy-indexed assignment.

Prefix caching: a request's ``prefix_block_hashes`` come at ``hash_block_tokens`` granularity
(a multiple of ``block_size``: 16 for vLLM-style traces, 512 for Mooncake). Physical block i
of a request is keyed ``(hashes[i // r], i % r)`` with ``r = hash_block_tokens // block_size``
and is cacheable when it is full and lies inside both the prompt and the hashed span. Only
prompt blocks are cacheable (the trace carries no token ids for generated text). As in vLLM,
a lookup stops at the first miss and never covers the last known token (it must be computed
to sample the next one).
"""

from __future__ import annotations

import numpy as np

from emulator.core.block_pool import BlockPool
from emulator.core.requests import RequestTable

_EMPTY = np.empty(0, np.int64)


class KVManager:
    """Block tables, slot allocation and prefix reuse for the requests of one replica."""

    def __init__(self, num_blocks: int, block_size: int, requests: RequestTable, *,
                 hash_block_tokens: int | None = None, enable_prefix_caching: bool = True) -> None:
        hbt = block_size if hash_block_tokens is None else int(hash_block_tokens)
        if hbt < block_size or hbt % block_size:
            raise ValueError(f"hash_block_tokens={hbt} must be a positive multiple of "
                             f"block_size={block_size}")
        self.pool = BlockPool(num_blocks)
        self.block_size = int(block_size)
        self.hash_block_tokens = hbt
        self._ratio = hbt // block_size
        self.requests = requests
        n = len(requests)
        self.num_req_blocks = np.zeros(n, np.int64)
        """int64 [N]: blocks in each request's table."""
        self.num_slot_tokens = np.zeros(n, np.int64)
        """int64 [N]: tokens each request has KV slots for (computed + in flight)."""
        self._offset = np.full(n, -1, np.int64)  # start of each request's region in _tables
        self._tables = np.zeros(max(1024, n), np.int64)
        self._tables_used = 0
        self._num_cached = np.zeros(n, np.int64)  # leading blocks already offered to the cache
        # Tokens of each request that prefix hashes cover (0: nothing cacheable).
        self._hash_limit = np.zeros(n, np.int64)
        if enable_prefix_caching and requests.prefix_block_hashes is not None:
            for i, h in enumerate(requests.prefix_block_hashes):
                if h is not None:
                    self._hash_limit[i] = min(int(h.size) * hbt, int(requests.prompt_tokens[i]))
        self._any_hashes = bool(self._hash_limit.any())
        self._total_blocks_held = 0  # sum of num_req_blocks (shared blocks counted per holder)
        self._total_slot_tokens = 0
        self.num_prefix_queries = 0
        """Admissions that looked up the prefix cache."""
        self.prefix_query_tokens = 0
        """Tokens looked up (known tokens of each admitted request)."""
        self.prefix_hit_tokens = 0
        """Tokens served from the prefix cache instead of being computed."""

    # ---- queries -------------------------------------------------------------------------
    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_used

    @property
    def usage(self) -> float:
        return self.pool.usage

    @property
    def internal_fragmentation_tokens(self) -> int:
        """Allocated token slots minus tokens using them, summed over requests (a block shared
        by prefix reuse counts once per holder)."""
        return self._total_blocks_held * self.block_size - self._total_slot_tokens

    def block_table(self, req: int) -> np.ndarray:
        """int64: the request's blocks in token order (a copy)."""
        o = self._offset[req]
        return self._tables[o:o + self.num_req_blocks[req]].copy()

    def blocks_needed(self, reqs: np.ndarray, num_new_tokens: np.ndarray) -> np.ndarray:
        """int64: new blocks each request needs to add ``num_new_tokens`` slots."""
        bs = self.block_size
        return (self.num_slot_tokens[reqs] + num_new_tokens + bs - 1) // bs - self.num_req_blocks[reqs]

    def slot_ids(self, reqs: np.ndarray, start_tokens: np.ndarray, num_tokens: np.ndarray) -> np.ndarray:
        """int64 [sum(num_tokens)]: KV slot ``block * block_size + offset`` of token positions
        ``start .. start + n - 1`` of each request, in request order."""
        total = int(num_tokens.sum())
        starts = np.cumsum(num_tokens) - num_tokens
        pos = np.repeat(start_tokens - starts, num_tokens) + np.arange(total)
        bs = self.block_size
        blocks = self._tables[np.repeat(self._offset[reqs], num_tokens) + pos // bs]
        return blocks * bs + pos % bs

    # ---- registration and prefix lookup --------------------------------------------------
    def register(self, req: int) -> None:
        """Reserve the request's block-table region (once per request, on arrival)."""
        if self._offset[req] >= 0:
            return
        r = self.requests
        size = -(-int(r.prompt_tokens[req] + r.output_tokens[req] - 1) // self.block_size)
        if self._tables_used + size > self._tables.size:
            grown = np.zeros(max(2 * self._tables.size, self._tables_used + size), np.int64)
            grown[:self._tables_used] = self._tables[:self._tables_used]
            self._tables = grown
        self._offset[req] = self._tables_used
        self._tables_used += size

    def _key(self, req: int, i: int) -> tuple[int, int]:
        return (int(self.requests.prefix_block_hashes[req][i // self._ratio]), i % self._ratio)

    def get_computed_blocks(self, req: int) -> np.ndarray:
        """Blocks of the longest cached prefix of a request that holds no blocks (no side
        effects). Never covers the last known token."""
        limit = self._hash_limit[req]
        if limit == 0:
            return np.empty(0, np.int64)
        known = int(self.requests.prompt_tokens[req] + self.requests.num_output_tokens[req])
        n_max = min(int(limit), known - 1) // self.block_size
        hits = []
        for i in range(n_max):
            b = self.pool.get_cached_block(self._key(req, i))
            if b is None:
                break
            hits.append(b)
        return np.asarray(hits, np.int64)

    def _cache_new_full_blocks(self, reqs: np.ndarray) -> None:
        """Offer newly full, hashed blocks of ``reqs`` to the prefix cache."""
        if not self._any_hashes:
            return
        target = np.minimum(self.num_slot_tokens[reqs], self._hash_limit[reqs]) // self.block_size
        todo = np.flatnonzero(target > self._num_cached[reqs])
        for j in todo.tolist():
            req = int(reqs[j])
            o = self._offset[req]
            for i in range(int(self._num_cached[req]), int(target[j])):
                self.pool.cache_block(int(self._tables[o + i]), self._key(req, i))
            self._num_cached[req] = target[j]

    # ---- allocation ----------------------------------------------------------------------
    def allocate_slots(self, req: int, num_new_tokens: int,
                       computed_blocks: np.ndarray | None = None) -> np.ndarray | None:
        """Add slots for ``num_new_tokens`` tokens to ``req``. ``computed_blocks`` (from
        :meth:`get_computed_blocks`, only for a request holding no blocks) are prefix hits put
        first in its table. Returns the newly allocated blocks, or None with no change when
        the pool cannot supply them. An admission with hits records the prefix query."""
        hits = np.empty(0, np.int64) if computed_blocks is None else computed_blocks
        if hits.size and self.num_req_blocks[req]:
            raise ValueError(f"request {req}: prefix hits for a request that already holds blocks")
        bs = self.block_size
        slot_tokens = int(self.num_slot_tokens[req]) + hits.size * bs + num_new_tokens
        need = -(-slot_tokens // bs) - int(self.num_req_blocks[req]) - hits.size
        # Hit blocks sitting in the free queue leave it, so they count against free blocks.
        num_evictable = int((self.pool.ref_cnt[hits] == 0).sum()) if hits.size else 0
        if need + num_evictable > self.pool.num_free:
            return None
        self.pool.touch(hits)
        new = self.pool.allocate(need)
        o = self._offset[req] + self.num_req_blocks[req]
        self._tables[o:o + hits.size] = hits
        self._tables[o + hits.size:o + hits.size + need] = new
        self.num_req_blocks[req] += hits.size + need
        self._total_blocks_held += hits.size + need
        self._total_slot_tokens += slot_tokens - int(self.num_slot_tokens[req])
        self.num_slot_tokens[req] = slot_tokens
        if computed_blocks is not None:
            self._num_cached[req] = hits.size
            self.num_prefix_queries += 1
            self.prefix_query_tokens += int(self.requests.prompt_tokens[req]
                                            + self.requests.num_output_tokens[req])
            self.prefix_hit_tokens += hits.size * bs
        self._cache_new_full_blocks(np.array([req]))
        return new

    def allocate_decode_slots(self, reqs: np.ndarray) -> np.ndarray | None:
        """One more slot for each request (a decode step), all or nothing: the new blocks in
        request order, or None with no change when the pool is short."""
        one = np.ones(reqs.size, np.int64)
        need = self.blocks_needed(reqs, one)
        if int(need.sum()) > self.pool.num_free:
            return None
        return self.allocate_bulk(reqs, one, need)

    def allocate_bulk(self, reqs: np.ndarray, num_new_tokens: np.ndarray, need: np.ndarray) -> np.ndarray:
        """Vectorized ``allocate_slots`` for requests that already hold their blocks; ``need``
        from :meth:`blocks_needed`. The caller guarantees ``need.sum() <= pool.num_free``.
        Blocks are handed out in request order, as successive ``allocate_slots`` calls would;
        returns them."""
        total = int(need.sum())
        new = _EMPTY
        if total:
            new = self.pool.allocate(total)
            starts = np.cumsum(need) - need
            dst = np.repeat(self._offset[reqs] + self.num_req_blocks[reqs] - starts, need) + np.arange(total)
            self._tables[dst] = new
            self.num_req_blocks[reqs] += need
            self._total_blocks_held += total
        self.num_slot_tokens[reqs] += num_new_tokens
        self._total_slot_tokens += int(num_new_tokens.sum())
        self._cache_new_full_blocks(reqs)
        return new

    def append_blocks(self, reqs: np.ndarray, counts: np.ndarray, pair_req: np.ndarray,
                      pair_index: np.ndarray, blocks: np.ndarray) -> None:
        """Append pre-ordered blocks (a decode run): ``blocks[t]`` goes to table position
        ``num_req_blocks + pair_index[t]`` of ``reqs[pair_req[t]]``; ``counts[j]`` blocks are
        appended to ``reqs[j]`` in all."""
        r = reqs[pair_req]
        self._tables[self._offset[r] + self.num_req_blocks[r] + pair_index] = blocks
        self.num_req_blocks[reqs] += counts
        self._total_blocks_held += int(blocks.size)

    def add_slot_tokens(self, reqs: np.ndarray, num_tokens: int) -> None:
        """Account ``num_tokens`` more slots for each request (blocks already appended)."""
        self.num_slot_tokens[reqs] += num_tokens
        self._total_slot_tokens += int(num_tokens) * int(reqs.size)

    def free(self, req: int) -> None:
        """Release all of the request's blocks, tail first (vLLM's eviction order)."""
        n = int(self.num_req_blocks[req])
        o = self._offset[req]
        self.pool.free(self._tables[o:o + n][::-1].copy())
        self._total_blocks_held -= n
        self._total_slot_tokens -= int(self.num_slot_tokens[req])
        self.num_req_blocks[req] = 0
        self.num_slot_tokens[req] = 0
        self._num_cached[req] = 0
