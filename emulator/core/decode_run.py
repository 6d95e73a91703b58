"""Fast-forward of steady decode: k steps in which every running request decodes one token,
applied with O(R + blocks) numpy work instead of k ``schedule`` + ``on_plan_done`` calls.

Block demand in closed form. A running request with context c (tokens in KV, which equals its
slot count) needs a new block at run step t (0-based) iff ``(c + t) % block_size == 0``, i.e.
at steps ``t = j0, j0 + bs, ...`` with ``j0 = (-c) % bs``. With ``C[m] = #{requests: j0 < m}``
the demand of the first k steps is ``D(k) = R * (k // bs) + C[k % bs]``, so the longest run
without preemption is the largest k with ``D(k) <= free blocks`` (no block is freed during
the run because nobody finishes before its last step).

Allocation order matches the step-by-step path exactly: step after step, and within a step in
running order, blocks are popped from the front of the free queue.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from emulator.core.scheduler import Scheduler


def _demand_table(j0: np.ndarray, bs: int) -> np.ndarray:
    """int64 [bs + 1]: C[m] = number of requests whose first new block comes at step < m."""
    table = np.zeros(bs + 1, np.int64)
    np.cumsum(np.bincount(j0, minlength=bs), out=table[1:])
    return table


@dataclass(slots=True)
class RunCache:
    """What :func:`horizon` derived, reused by :func:`blocks_used` and :func:`advance` while
    the scheduler's state is unchanged (``version`` equals ``Scheduler._version``)."""

    version: int
    horizon: int
    j0: np.ndarray  # int64 [R]: first run step at which each running request needs a block
    table: np.ndarray  # int64 [bs + 1]: _demand_table(j0)


def _steady_state(s: Scheduler) -> tuple[np.ndarray, np.ndarray] | None:
    """(running, their contexts) if every running request is a plain decode, else None."""
    if s.num_micro_batches != 1 or s._plans or s._running.size == 0:
        return None
    if s._running.size > s.config.max_num_batched_tokens:
        return None
    r = s.requests
    run = s._running
    c = r.num_computed_tokens[run]
    out = r.num_output_tokens[run]
    # A plain decode has sampled (out >= 1) and holds every known token but the last.
    if out.min() < 1 or not (c == r.prompt_tokens[run] + out - 1).all():
        return None
    return run, c


def _head_admissible(s: Scheduler, free_blocks: int) -> bool:
    """Could the head of the waiting queue be admitted next to the running decodes with
    ``free_blocks`` free? Prefix hits can only be lost and free blocks only shrink during a
    run, so False here stays False for the whole run."""
    cfg, r, kv = s.config, s.requests, s.kv
    budget = cfg.max_num_batched_tokens - int(s._running.size)
    if not s._waiting or s._running.size >= cfg.max_num_seqs or budget <= 0:
        return False
    head = s._waiting[0]
    hits = kv.get_computed_blocks(head)
    num_hit = hits.size * cfg.block_size
    n = int(r.prompt_tokens[head] + r.num_output_tokens[head]) - num_hit
    if n > budget:
        if not cfg.enable_chunked_prefill:
            return False
        n = budget
    need = -(-(num_hit + n) // cfg.block_size) - hits.size
    need += int((kv.pool.ref_cnt[hits] == 0).sum()) if hits.size else 0
    # The admission watermark (Scheduler._fits; decodes are running, so it applies).
    return need + s.watermark_blocks <= free_blocks


def horizon(s: Scheduler, max_steps: int) -> int:
    """See :meth:`Scheduler.steady_decode_horizon`."""
    s._run_cache = None
    if max_steps <= 0 or s.num_micro_batches != 1 or s._plans or s._running.size == 0:
        return 0
    free = s.kv.pool.num_free
    # Cheap exit first (every arrival ends here once): the first step needs at most one
    # block per running request, so a head admissible with that many fewer blocks is
    # admissible after it.
    if s._waiting and _head_admissible(s, free - int(s._running.size)):
        return 0
    state = _steady_state(s)
    if state is None:
        return 0
    run, c = state
    r = s.requests
    bs = s.config.block_size
    k = min(int(max_steps), int((r.output_tokens[run] - r.num_output_tokens[run]).min()))
    j0 = (-c) % bs
    table = _demand_table(j0, bs)
    q, left = divmod(free, run.size)
    rem = int(np.searchsorted(table, left, side="right")) - 1
    k = min(k, q * bs + rem)
    if k <= 0 or (s._waiting and _head_admissible(s, free - int(table[1]))):
        return 0
    s._run_cache = RunCache(s._version, k, j0, table)
    return k


def _cache(s: Scheduler) -> RunCache:
    """The horizon's cache for the current state (computing it if the state changed)."""
    cache = s._run_cache
    if cache is None or cache.version != s._version:
        horizon(s, 1)  # fills the cache when the state is steady at all
        cache = s._run_cache
        if cache is None:
            bs = s.config.block_size
            j0 = (-s.requests.num_computed_tokens[s._running]) % bs
            cache = RunCache(s._version, 0, j0, _demand_table(j0, bs))
    return cache


def blocks_used(s: Scheduler, k: int) -> np.ndarray:
    """See :meth:`Scheduler.decode_run_kv_blocks_used`."""
    bs = s.config.block_size
    table = _cache(s).table
    t = np.arange(1, k + 1)
    q, m = np.divmod(t, bs)
    return s.kv.num_used_blocks + s._running.size * q + table[m]


def advance(s: Scheduler, k: int, step_end_s: np.ndarray) -> np.ndarray:
    """See :meth:`Scheduler.advance_decode_run`."""
    step_end_s = np.asarray(step_end_s, dtype=np.float64)
    if step_end_s.shape != (k,):
        raise ValueError(f"step_end_s must have shape ({k},), got {step_end_s.shape}")
    if k <= 0:
        return np.empty(0, np.int64)
    cache = s._run_cache
    if cache is None or cache.version != s._version or cache.horizon < k:
        h = horizon(s, k)
        if h < k:
            raise ValueError(f"advance_decode_run(k={k}) exceeds steady_decode_horizon={h}")
        cache = s._run_cache
    r, kv = s.requests, s.kv
    bs = s.config.block_size
    run = s._running
    j0 = cache.j0
    total = int(cache.table[bs]) * (k // bs) + int(cache.table[k % bs])
    if k <= bs:
        # Short run (the common case between arrivals): at most one block per request, at
        # its step j0; pairs sorted by step, then running position (stable sort).
        counts = (j0 < k).astype(np.int64)
        pos = np.flatnonzero(counts)
        pair_pos = pos[np.argsort(j0[pos], kind="stable")]
        pair_index = np.zeros(total, np.int64)
    else:
        counts = np.where(j0 < k, (k - 1 - j0) // bs + 1, 0)
        # Pairs (step, running position) needing a block, sorted by step then position:
        # step t serves group t % bs, whose members (in running order) sit contiguously in
        # `grouped`.
        grouped = np.argsort(j0, kind="stable")
        cnt = np.diff(cache.table)
        gstart = cache.table[:-1]
        steps = np.arange(k)
        g = steps % bs
        sizes = cnt[g]
        first = np.cumsum(sizes) - sizes
        pair_pos = grouped[np.repeat(gstart[g] - first, sizes) + np.arange(total)]
        pair_index = (np.repeat(steps, sizes) - j0[pair_pos]) // bs
    blocks = kv.pool.allocate(total)
    kv.append_blocks(run, counts, pair_pos, pair_index, blocks)
    kv.add_slot_tokens(run, k)
    r.num_computed_tokens[run] += k
    r.num_output_tokens[run] += k
    s.num_steps += k
    s._version += 1
    s._run_cache = None
    done = run[r.num_output_tokens[run] >= r.output_tokens[run]]
    if done.size:
        s._finish(done, float(step_end_s[-1]))
    return done
