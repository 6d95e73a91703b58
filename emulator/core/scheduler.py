"""Continuous-batching scheduler of one DP replica (vLLM v1 ``sched/scheduler.py``
semantics, FCFS), vectorized over the running set.

Each ``schedule`` call forms one :class:`BatchPlan`:

1. Running requests of the plan's slot, oldest first, each get their missing tokens (1 for
   a decode, a chunk for an unfinished prefill) while the token budget lasts. When the pool
   cannot supply a request's new blocks, the slot's newest running request is preempted
   (recompute: its blocks are freed, its computed tokens reset, it goes to the *front* of
   the waiting queue) until the request fits or is itself the victim.
2. If nobody was preempted, waiting requests are admitted in order while the slot's seats,
   the token budget and free blocks allow (prefix hits first); no preemption to admit.

``num_computed_tokens`` advances when a plan is formed (as in vLLM v1); tokens are sampled
and requests finish in :meth:`Scheduler.on_plan_done`.

Pipeline parallelism (``num_micro_batches`` = pp > 1) follows vLLM v0's virtual engines,
one per micro-batch slot, so that pp micro-batches are in flight whenever the requests and
the KV cache allow it:

- A running request belongs to one slot, chosen at admission: a plan of slot m admits while
  m holds fewer than its equal share ``ceil((running + waiting) / pp)`` of the replica's
  requests, so new requests go to the least-loaded slots. Only slot m's plans schedule (and
  preempt) slot m's requests; a preempted request loses its slot and gets one again when it
  is re-admitted. Idle slots are interchangeable: asked for an empty slot while another idle
  slot holds requests, the scheduler swaps the two slots' requests (neither is in flight),
  so ``schedule`` returns None only when no idle slot can run anything.
- ``max_num_seqs`` and ``max_num_batched_tokens`` apply per slot (per micro-batch), as each
  vLLM v0 virtual engine has its own scheduler with the full scheduler config: a replica runs
  up to ``pp * max_num_seqs`` requests. The KV pool is shared by the slots (vLLM v0 splits it
  evenly, ``num_gpu_blocks // pp``; sharing lets one slot use what another does not need).
- Admission needs room for the request's whole known sequence (prompt + generated tokens),
  as v0's ``can_allocate`` does, not only for its first chunk, and keeps ``watermark`` of the
  pool free (v0's default 0.01). Admitting a preempted request's first chunk let the next
  slot re-admit every victim at once, and its next chunk preempted again (thrashing: 300
  recomputed tokens per output token for 405B at PP=8); the whole-sequence rule stops it.
  With pp == 1 admission needs room for the chunk only and the default watermark is 0
  (vLLM v1 has none), as before.

So a KV-limited replica forms fewer or smaller micro-batches (pipeline bubbles), and with
ample KV every slot carries a share of the requests.

A request that can never be served is rejected on arrival rather than livelocking: it needs
more blocks than the pool has for ``prompt + output - 1`` tokens, or (without chunked prefill)
more than ``max_num_batched_tokens`` for a full recompute (vLLM requires ``max_model_len <=
max_num_batched_tokens`` then).

Steady decode can be fast-forwarded (:mod:`emulator.core.decode_run`).
"""

from __future__ import annotations

from collections import deque
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from emulator.core import decode_run
from emulator.core.kv_manager import KVManager
from emulator.core.plan import BatchPlan
from emulator.core.requests import RequestTable, Status
from emulator.errors import ConfigError

_EMPTY = np.empty(0, np.int64)
# Status values as plain ints: numpy compares and stores them without converting the enum.
_PENDING, _WAITING, _RUNNING, _FINISHED, _REJECTED = (int(s) for s in (
    Status.PENDING, Status.WAITING, Status.RUNNING, Status.FINISHED, Status.REJECTED))


class SchedulerConfig(BaseModel):
    """Scheduler knobs, named and defaulted as in vLLM v1 (v0 for pipeline parallelism)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_num_seqs: int = Field(256, ge=1, description="Maximum running sequences per replica (vLLM max_num_seqs).")
    max_num_batched_tokens: int = Field(8192, ge=1, description="Token budget per step (vLLM max_num_batched_tokens).")
    block_size: int = Field(16, ge=1, description="KV block size in tokens.")
    enable_chunked_prefill: bool = Field(True, description="Split prompts across steps to fit the token budget; without it a prompt (and a recompute) must fit the budget whole.")
    preemption_mode: Literal["recompute", "swap"] = Field("recompute", description="What a preempted request loses: recompute frees its KV and re-prefills prompt + generated tokens (swap is not supported yet).")
    enable_prefix_caching: bool = Field(True, description="Reuse cached KV blocks of equal prompt prefixes (needs prefix_block_hashes in the trace).")
    hash_block_tokens: int | None = Field(None, ge=1, description="Tokens per entry of the trace's prefix_block_hashes (Mooncake: 512); a multiple of block_size; default block_size.")
    record_slots: bool = Field(False, description="Fill BatchPlan.new_slot_ids (the emulator writes real KV rows there).")
    watermark: float | None = Field(None, ge=0.0, lt=1.0, description="Fraction of the KV blocks an admission must leave free (vLLM v0 watermark); default 0 without pipeline parallelism (vLLM v1) and 0.01 with it (vLLM v0).")

    @model_validator(mode="after")
    def _check(self) -> SchedulerConfig:
        # vLLM's check too: with fewer tokens than seats, the newest decodes would starve.
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens={self.max_num_batched_tokens} must be >= "
                             f"max_num_seqs={self.max_num_seqs} (one decode token per sequence)")
        if self.hash_block_tokens is not None and self.hash_block_tokens % self.block_size:
            raise ValueError(f"hash_block_tokens={self.hash_block_tokens} must be a multiple of "
                             f"block_size={self.block_size}")
        return self


class Scheduler:
    """FCFS continuous batching over one replica's KV pool; see the module docstring."""

    def __init__(self, config: SchedulerConfig, num_kv_blocks: int, requests: RequestTable, *,
                 num_micro_batches: int = 1, replica: int = 0) -> None:
        if config.preemption_mode == "swap":
            raise ConfigError("preemption_mode='swap' is not supported yet; use 'recompute'")
        if num_kv_blocks < 1:
            raise ConfigError(f"replica {replica}: num_kv_blocks={num_kv_blocks}; the KV cache "
                              "needs at least one block (more memory or a smaller model)")
        if num_micro_batches < 1:
            raise ConfigError(f"num_micro_batches={num_micro_batches} must be >= 1")
        self.config = config
        self.requests = requests
        self.replica = replica
        self.num_micro_batches = num_micro_batches
        self.kv = KVManager(num_kv_blocks, config.block_size, requests,
                            hash_block_tokens=config.hash_block_tokens,
                            enable_prefix_caching=config.enable_prefix_caching)
        self._running = _EMPTY  # int64: running requests, oldest admission first
        self._waiting: deque[int] = deque()
        self._slot = np.zeros(len(requests), np.int64)  # micro-batch slot of each running request
        self._plans: dict[int, BatchPlan] = {}  # micro-batch slot -> plan in flight
        wm = config.watermark if config.watermark is not None else (0.01 if num_micro_batches > 1 else 0.0)
        self.watermark_blocks = int(wm * num_kv_blocks)
        """Blocks an admission leaves free (vLLM v0: ``int(watermark * num_gpu_blocks)``)."""
        # vLLM v0 (the PP engine) allocates a request's whole known sequence on admission.
        self._admit_whole = num_micro_batches > 1
        self.num_steps = 0
        """Plans formed so far (the next plan's ``step``)."""
        self.num_preemptions_total = 0
        self.num_rejected = 0
        # Bumped by every state change: the steady-decode horizon's cache is valid while
        # it is unchanged (decode_run.RunCache).
        self._version = 0
        self._run_cache: decode_run.RunCache | None = None

    # ---- state ---------------------------------------------------------------------------
    @property
    def has_work(self) -> bool:
        return bool(self._running.size or self._waiting)

    @property
    def num_running(self) -> int:
        return int(self._running.size)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_outstanding(self) -> int:
        """Requests routed here and not finished (running + waiting)."""
        return int(self._running.size) + len(self._waiting)

    @property
    def num_plans_in_flight(self) -> int:
        return len(self._plans)

    @property
    def kv_blocks_used(self) -> int:
        return self.kv.num_used_blocks

    @property
    def kv_blocks_total(self) -> int:
        return self.kv.pool.num_blocks

    @property
    def kv_usage(self) -> float:
        return self.kv.usage

    def running_requests(self) -> np.ndarray:
        """int64: running request indices, oldest admission first (a copy)."""
        return self._running.copy()

    def running_slots(self) -> np.ndarray:
        """int64: micro-batch slot of each running request, in running order (all 0 at pp 1)."""
        return self._slot[self._running]

    def waiting_requests(self) -> np.ndarray:
        """int64: waiting request indices in queue order."""
        return np.fromiter(self._waiting, np.int64, len(self._waiting))

    def decode_contexts(self) -> np.ndarray:
        """int64 [R]: context tokens (KV length) of each running request, in running order;
        during a steady decode run, step j (0-based) of request r has context ``c[r] + j``."""
        return self.requests.num_computed_tokens[self._running]

    # ---- arrival -------------------------------------------------------------------------
    def add_request(self, idx: int, now_s: float) -> bool:
        """Queue an arrived request; False if it can never be served here (then its status is
        REJECTED and ``requests.rejections[idx]`` says why)."""
        r, cfg = self.requests, self.config
        self._version += 1
        if r.status[idx] != _PENDING:
            raise ValueError(f"request {idx} ({r.request_id[idx]}) was already added")
        r.replica[idx] = self.replica
        max_kv_tokens = int(r.prompt_tokens[idx] + r.output_tokens[idx] - 1)
        need = -(-max_kv_tokens // cfg.block_size)
        reason = None
        if need > self.kv_blocks_total:
            reason = (f"request {r.request_id[idx]}: prompt + output needs {need} KV blocks, replica "
                      f"{self.replica} has {self.kv_blocks_total}; give the KV cache more memory "
                      "or cap output tokens")
        elif not cfg.enable_chunked_prefill and max_kv_tokens > cfg.max_num_batched_tokens:
            reason = (f"request {r.request_id[idx]}: prompt + output = {max_kv_tokens + 1} tokens "
                      f"exceed max_num_batched_tokens={cfg.max_num_batched_tokens} without chunked "
                      "prefill; enable chunked prefill or raise the budget")
        if reason is not None:
            r.status[idx] = _REJECTED
            r.rejections[int(idx)] = reason
            self.num_rejected += 1
            return False
        r.status[idx] = _WAITING
        self.kv.register(idx)
        self._waiting.append(int(idx))
        return True

    # ---- one step ------------------------------------------------------------------------
    def schedule(self, now_s: float, micro_batch: int = 0) -> BatchPlan | None:
        """Form the plan of the next step in slot ``micro_batch``; None when nothing can run."""
        if not 0 <= micro_batch < self.num_micro_batches:
            raise ValueError(f"micro_batch={micro_batch} outside 0..{self.num_micro_batches - 1}")
        if micro_batch in self._plans:
            raise ValueError(f"micro-batch slot {micro_batch} already has a plan in flight")
        self._version += 1
        num_preempted = 0
        while True:
            if self.num_micro_batches > 1:
                self._take_idle_slot(micro_batch)
            reqs, num_new, ctx, preempted = self._schedule_once(micro_batch)
            num_preempted += preempted
            # A step whose only candidate preempted itself is empty: form the next one now
            # (vLLM would run an empty step); it cannot preempt again.
            if reqs.size or not preempted:
                break
        if reqs.size == 0:
            return None
        r = self.requests
        out = r.num_output_tokens[reqs]
        is_decode = (num_new == 1) & (ctx == r.prompt_tokens[reqs] + out - 1) & (out >= 1)
        plan = BatchPlan(
            replica=self.replica, step=self.num_steps, micro_batch=micro_batch,
            request_ids=r.request_id[reqs].tolist(), request_index=reqs,
            num_new_tokens=num_new, num_context_tokens=ctx, is_prefill=~is_decode,
            new_slot_ids=self.kv.slot_ids(reqs, ctx, num_new) if self.config.record_slots else None,
            num_preempted=num_preempted)
        self._plans[micro_batch] = plan
        self.num_steps += 1
        return plan

    def _take_idle_slot(self, m: int) -> None:
        """If slot m holds no running request, take over the requests of the lowest idle slot
        that holds some (idle slots are interchangeable: neither is in flight)."""
        slots = self._slot[self._running]
        if (slots == m).any():
            return
        for k in range(self.num_micro_batches):
            if k != m and k not in self._plans and (slots == k).any():
                self._slot[self._running[slots == k]] = m
                return

    def _schedule_once(self, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        r, cfg = self.requests, self.config
        running = self._running
        cand = running[self._slot[running] == m] if self.num_micro_batches > 1 else running
        budget = cfg.max_num_batched_tokens
        num_sched, preempted = 0, 0
        num_new = ctx = _EMPTY
        if cand.size:
            ctx = r.num_computed_tokens[cand]
            missing = r.prompt_tokens[cand] + r.num_output_tokens[cand] - ctx
            cum = np.cumsum(missing)
            s = int(np.searchsorted(cum, budget, side="right"))
            num_new = missing[:s]
            left = budget - (int(cum[s - 1]) if s else 0)
            if s < cand.size and left > 0:  # the budget ends inside this request's chunk
                num_new = np.append(num_new, left)
                s += 1
            need = self.kv.blocks_needed(cand[:s], num_new)
            if int(need.sum()) <= self.kv.pool.num_free:
                self.kv.allocate_bulk(cand[:s], num_new, need)
                num_sched = s
            else:
                num_sched, preempted = self._allocate_preempting(cand, s, num_new, need)
            num_new, ctx = num_new[:num_sched], ctx[:num_sched]
            r.num_computed_tokens[cand[:num_sched]] += num_new
            budget -= int(num_new.sum())
        reqs = cand[:num_sched]
        if not preempted and self._waiting and budget > 0:
            adm, adm_new, adm_ctx = self._admit(budget, m)
            if adm.size:
                reqs = np.concatenate([reqs, adm])
                num_new = np.concatenate([num_new, adm_new])
                ctx = np.concatenate([ctx, adm_ctx])
        return reqs, num_new, ctx, preempted

    def _allocate_preempting(self, cand: np.ndarray, s: int, num_new: np.ndarray,
                             need: np.ndarray) -> tuple[int, int]:
        """Allocate for ``cand[:s]`` in order, preempting the newest candidates on shortage
        (vLLM's retry loop). Returns (number scheduled, number preempted)."""
        pool = self.kv.pool
        i, end, preempted = 0, cand.size, 0
        while i < min(s, end):
            seg = min(s, end)
            cum = np.cumsum(need[i:seg])
            j = i + int(np.searchsorted(cum, pool.num_free, side="right"))
            if j > i:
                self.kv.allocate_bulk(cand[i:j], num_new[i:j], need[i:j])
                i = j
            if i >= seg:
                break
            while True:  # cand[i] does not fit: free the newest until it does
                end -= 1
                self._preempt(int(cand[end]))
                preempted += 1
                if end == i or need[i] <= pool.num_free:
                    break
        self._running = self._running[self.requests.status[self._running] == _RUNNING]
        return i, preempted

    def _preempt(self, req: int) -> None:
        r = self.requests
        self.kv.free(req)
        r.num_computed_tokens[req] = 0
        r.status[req] = _WAITING
        r.num_preemptions[req] += 1
        self.num_preemptions_total += 1
        self._waiting.appendleft(req)

    def _seats(self, m: int) -> int:
        """Requests slot m may admit now: its free seats (``max_num_seqs`` per slot) and, with
        PP, what keeps it within its equal share of the replica's requests."""
        num_running = int(self._running.size)
        if self.num_micro_batches == 1:
            return self.config.max_num_seqs - num_running
        pp = self.num_micro_batches
        mine = int((self._slot[self._running] == m).sum())
        share = -(-(num_running + len(self._waiting)) // pp)
        return min(self.config.max_num_seqs, share) - mine

    def _fits(self, req: int, hits: np.ndarray, num_tokens: int, alone: bool) -> bool:
        """Whether admitting ``req`` with ``num_tokens`` new tokens leaves the watermark free,
        with PP counting its whole known sequence (vLLM v0 ``can_allocate``). The watermark
        is waived for a request that would run ``alone``, so one that fits the empty pool is
        never stuck (vLLM v0 would abort it)."""
        if self._admit_whole:
            num_tokens = int(self.requests.prompt_tokens[req] + self.requests.num_output_tokens[req]) \
                - hits.size * self.config.block_size
        if not self.watermark_blocks and not self._admit_whole:
            return True  # allocate_slots checks the chunk itself
        kv = self.kv
        need = -(-num_tokens // kv.block_size)
        need += int((kv.pool.ref_cnt[hits] == 0).sum()) if hits.size else 0
        margin = 0 if alone else self.watermark_blocks
        return kv.pool.num_free - need >= margin

    def _admit(self, budget: int, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Admit waiting requests into slot m in order while seats, budget and blocks last."""
        r, cfg, kv = self.requests, self.config, self.kv
        adm: list[int] = []
        adm_new: list[int] = []
        adm_ctx: list[int] = []
        seats = self._seats(m)
        while self._waiting and len(adm) < seats and budget > 0:
            req = self._waiting[0]
            hits = kv.get_computed_blocks(req)
            num_hit = hits.size * cfg.block_size
            n = int(r.prompt_tokens[req] + r.num_output_tokens[req]) - num_hit
            if n > budget:
                if not cfg.enable_chunked_prefill:
                    break
                n = budget
            alone = not adm and not self._running.size
            if not self._fits(req, hits, n, alone) or kv.allocate_slots(req, n, hits) is None:
                break
            self._waiting.popleft()
            r.status[req] = _RUNNING
            r.num_computed_tokens[req] = num_hit + n
            budget -= n
            adm.append(req)
            adm_new.append(n)
            adm_ctx.append(num_hit)
        if not adm:
            return _EMPTY, _EMPTY, _EMPTY
        a = np.asarray(adm, np.int64)
        self._slot[a] = m
        self._running = np.concatenate([self._running, a])
        return a, np.asarray(adm_new, np.int64), np.asarray(adm_ctx, np.int64)

    def on_plan_done(self, plan: BatchPlan, end_s: float) -> np.ndarray:
        """Apply a finished plan at ``end_s``: sample a token for every request that computed
        its last known token, stamp first/finish times, free finished requests. Returns the
        indices of the requests that finished, in plan order."""
        if self._plans.get(plan.micro_batch) is not plan:
            raise ValueError(f"plan step {plan.step} is not in flight in slot {plan.micro_batch}")
        del self._plans[plan.micro_batch]
        self._version += 1
        r = self.requests
        idx = plan.request_index
        sampled = idx[r.num_computed_tokens[idx] == r.prompt_tokens[idx] + r.num_output_tokens[idx]]
        r.num_output_tokens[sampled] += 1
        first = sampled[np.isnan(r.first_token_s[sampled])]
        r.first_token_s[first] = end_s
        done = sampled[r.num_output_tokens[sampled] >= r.output_tokens[sampled]]
        if done.size:
            self._finish(done, end_s)
        return done

    def _finish(self, done: np.ndarray, end_s: float) -> None:
        r = self.requests
        r.finish_s[done] = end_s
        r.status[done] = _FINISHED
        for req in done.tolist():
            self.kv.free(req)
        self._running = self._running[r.status[self._running] == _RUNNING]

    # ---- steady-decode fast-forward (pp == 1) ----------------------------------------------
    def steady_decode_horizon(self, max_steps: int) -> int:
        """Steps k >= 0 (<= max_steps) whose plans are certain to be: every running request
        decodes one token, nobody is admitted or preempted, nobody finishes before step k.
        Arrivals during the run do not change this when the waiting queue is non-empty (they
        queue behind a head that cannot be admitted); with an empty queue the caller must
        stop the run at the next arrival."""
        return decode_run.horizon(self, max_steps)

    def decode_run_kv_blocks_used(self, k: int) -> np.ndarray:
        """int64 [k]: KV blocks in use after forming each of the next k steady-decode plans
        (before finished requests free theirs)."""
        return decode_run.blocks_used(self, k)

    def advance_decode_run(self, k: int, step_end_s: np.ndarray) -> np.ndarray:
        """Apply k steady-decode steps at once (k <= ``steady_decode_horizon``); ``step_end_s``
        float64 [k] are the steps' end times. Leaves exactly the state k ``schedule`` +
        ``on_plan_done`` calls would. Returns the indices of the requests that finished."""
        return decode_run.advance(self, k, step_end_s)
