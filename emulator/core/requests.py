"""Per-request state as numpy columns (no per-request Python objects).

One :class:`RequestTable` holds every request of a run, indexed by its row in the trace. The
scheduler of each DP replica mutates only the rows routed to it, so all replicas can share
one table and the output writer reads the columns directly.

Token accounting follows vLLM v1 (``vllm/v1/request.py``): a request knows
``prompt_tokens + num_output_tokens`` tokens; ``num_computed_tokens`` of them are in the KV
cache (or being computed by a plan in flight). A step computes the missing ones and, when it
reaches the last known token, samples one more output token. A decode therefore computes
exactly the token sampled by the previous step. With recompute preemption
``num_computed_tokens`` drops to 0 and the request re-prefills its prompt *and* the tokens it
already generated, then samples its next token. The final output token is sampled but never
written to the KV cache, so a request holds at most ``prompt + output - 1`` tokens of KV.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING

import numpy as np

from emulator.errors import TraceError

if TYPE_CHECKING:
    from emulator.trace.schema import Trace


class Status(IntEnum):
    """Life cycle of a request (stored as int8 in :attr:`RequestTable.status`)."""

    PENDING = 0
    """Not yet arrived (``add_request`` not called)."""
    WAITING = 1
    """Arrived, in a replica's waiting queue (new, or preempted and waiting to recompute)."""
    RUNNING = 2
    """Admitted: holds KV blocks in its replica's pool."""
    FINISHED = 3
    """All output tokens sampled; ``finish_s`` is set and its blocks are freed."""
    REJECTED = 4
    """Can never be served by its replica (see ``RequestTable.rejections`` for why)."""


@dataclass(slots=True)
class RequestTable:
    """Trace columns plus mutable serving state, one row per request ([N] arrays)."""

    request_id: np.ndarray
    """object [N]: request ids (str)."""
    arrival_s: np.ndarray
    """float64 [N]: arrival time, seconds."""
    prompt_tokens: np.ndarray
    """int64 [N]: prompt length, >= 1."""
    output_tokens: np.ndarray
    """int64 [N]: tokens to generate (including reasoning tokens), >= 1."""
    prefix_block_hashes: list[np.ndarray | None] | None
    """Per request, int64 hashes of the prompt's hash blocks (chained: equal hash at position
    j implies equal tokens 0..end of block j), or None for the whole table / a row."""
    num_computed_tokens: np.ndarray
    """int64 [N]: tokens in the KV cache or being computed by a plan in flight."""
    num_output_tokens: np.ndarray
    """int64 [N]: output tokens sampled so far."""
    first_token_s: np.ndarray
    """float64 [N]: when the first output token was sampled (nan until then)."""
    finish_s: np.ndarray
    """float64 [N]: when the last output token was sampled (nan until then)."""
    num_preemptions: np.ndarray
    """int32 [N]: times the request was preempted (its KV freed, to be recomputed)."""
    replica: np.ndarray
    """int32 [N]: DP replica the request was routed to (-1 until routed)."""
    status: np.ndarray
    """int8 [N]: a :class:`Status` value."""
    rejections: dict[int, str] = field(default_factory=dict)
    """Row index -> why the request was rejected (status REJECTED)."""

    @classmethod
    def from_columns(cls, request_id: Sequence[str] | np.ndarray, arrival_s: Sequence[float] | np.ndarray,
                     prompt_tokens: Sequence[int] | np.ndarray, output_tokens: Sequence[int] | np.ndarray,
                     prefix_block_hashes: Sequence[Sequence[int] | np.ndarray | None] | None = None,
                     ) -> RequestTable:
        """Build a table with fresh state from trace columns (copies the inputs)."""
        ids = np.asarray(request_id, dtype=object).copy()
        arr = np.asarray(arrival_s, dtype=np.float64).copy()
        prompt = np.asarray(prompt_tokens, dtype=np.int64).copy()
        out = np.asarray(output_tokens, dtype=np.int64).copy()
        n = ids.shape[0]
        for name, col in (("arrival_s", arr), ("prompt_tokens", prompt), ("output_tokens", out)):
            if col.shape != (n,):
                raise TraceError(f"{name}: expected {n} values (one per request_id), got shape {col.shape}")
        for name, col in (("prompt_tokens", prompt), ("output_tokens", out)):
            bad = np.flatnonzero(col < 1)
            if bad.size:
                raise TraceError(f"{name}: row {bad[0]} is {col[bad[0]]}; every request needs >= 1")
        if np.isnan(arr).any():
            raise TraceError(f"arrival_s: row {int(np.flatnonzero(np.isnan(arr))[0])} is nan")
        hashes = None
        if prefix_block_hashes is not None:
            if len(prefix_block_hashes) != n:
                raise TraceError(f"prefix_block_hashes: expected {n} rows, got {len(prefix_block_hashes)}")
            hashes = [None if h is None or len(h) == 0 else np.asarray(h, dtype=np.int64)
                      for h in prefix_block_hashes]
        return cls(
            request_id=ids, arrival_s=arr, prompt_tokens=prompt, output_tokens=out,
            prefix_block_hashes=hashes,
            num_computed_tokens=np.zeros(n, np.int64),
            num_output_tokens=np.zeros(n, np.int64),
            first_token_s=np.full(n, np.nan),
            finish_s=np.full(n, np.nan),
            num_preemptions=np.zeros(n, np.int32),
            replica=np.full(n, -1, np.int32),
            status=np.zeros(n, np.int8),
        )

    @classmethod
    def from_trace(cls, trace: Trace) -> RequestTable:
        """Build from an :class:`emulator.trace.schema.Trace` (its hash granularity,
        ``trace.prefix_block_size_tokens``, is the scheduler's ``hash_block_tokens``)."""
        return cls.from_columns(trace.request_id, trace.arrival_time_s, trace.prompt_tokens,
                                trace.output_tokens, trace.prefix_block_hashes)

    def __len__(self) -> int:
        return int(self.arrival_s.shape[0])

    @property
    def num_known_tokens(self) -> np.ndarray:
        """int64 [N]: prompt plus sampled output tokens (what a full recompute computes)."""
        return self.prompt_tokens + self.num_output_tokens

    def state_arrays(self) -> dict[str, np.ndarray]:
        """The mutable columns by name (for comparisons and output writers)."""
        return {"num_computed_tokens": self.num_computed_tokens,
                "num_output_tokens": self.num_output_tokens,
                "first_token_s": self.first_token_s, "finish_s": self.finish_s,
                "num_preemptions": self.num_preemptions, "replica": self.replica,
                "status": self.status}
