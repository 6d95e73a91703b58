"""The contract between the scheduler and the executors.

One scheduler (pure, time passed in) produces a :class:`BatchPlan` per step; an executor
(the simulator's cost-model executor or the Ray executor) runs or prices it and returns a
:class:`StepResult`. Both executors consume exactly this object, so a difference between
simulation and emulation is a difference in execution, never in policy.

All times are *target* seconds (host time divided by ``dilation`` in the emulator).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass(slots=True)
class BatchPlan:
    """What one DP replica runs in one step (one micro-batch when PP > 1)."""

    replica: int
    """DP replica index (0..dp-1)."""
    step: int
    """Step counter within the replica, starting at 0, +1 per plan."""
    micro_batch: int
    """PP micro-batch slot (0..pp-1) this plan occupies; 0 without PP."""
    request_ids: list[str]
    """Requests in the batch, in scheduling order (prefills after running decodes)."""
    request_index: np.ndarray
    """int64 [R]: each request's row index in the trace (stable integer id)."""
    num_new_tokens: np.ndarray
    """int64 [R]: tokens computed this step per request (a prefill chunk, or 1 for decode)."""
    num_context_tokens: np.ndarray
    """int64 [R]: tokens already in the KV cache of each request before this step."""
    is_prefill: np.ndarray
    """bool [R]: True while the request is still computing its prompt (or recomputing it
    after a preemption); False for decode."""
    new_slot_ids: np.ndarray | None = None
    """int64 [sum(num_new_tokens)] or None: for every token computed this step, its KV slot
    ``block_id * block_size + offset`` in the replica's block pool, in request order. Filled
    only when the scheduler is asked to (the emulator writes real KV rows there)."""
    num_preempted: int = 0
    """Requests preempted while forming this plan (their blocks were freed)."""

    @property
    def num_requests(self) -> int:
        return len(self.request_ids)

    @property
    def num_tokens(self) -> int:
        return int(self.num_new_tokens.sum())

    @property
    def num_prefill_tokens(self) -> int:
        return int(self.num_new_tokens[self.is_prefill].sum())

    @property
    def num_decode_tokens(self) -> int:
        return int(self.num_new_tokens[~self.is_prefill].sum())


@dataclass(slots=True)
class StepResult:
    """How long a plan took (measured by the emulator, predicted by the simulator)."""

    replica: int
    step: int
    micro_batch: int
    start_s: float
    """When stage 0 began the plan."""
    end_s: float
    """When the last stage finished the plan (tokens of this step are emitted then)."""
    stage_start_s: np.ndarray
    """float64 [pp]: when each pipeline stage began this plan."""
    stage_end_s: np.ndarray
    """float64 [pp]: when each pipeline stage finished this plan."""
    compute_s: float
    """Compute time summed over stages (per stage: the slowest rank)."""
    comm_s: float
    """Communication time summed over stages (TP/EP collectives and PP transfers), including
    sync-wait for stragglers."""
    comm_by_axis_s: dict[str, float] = field(default_factory=dict)
    """Communication time per mesh axis ('tp', 'pp', 'ep')."""
    stage_compute_s: np.ndarray | None = None
    """float64 [pp] or None: compute time of each stage (its slowest rank)."""
    stage_comm_s: np.ndarray | None = None
    """float64 [pp] or None: time of each stage's own collectives (TP/EP); the stage-to-stage
    transfer happens before ``stage_start_s`` of the receiving stage and is counted in
    ``comm_s`` and ``comm_by_axis_s['pp']``."""


class Executor(Protocol):
    """Runs or prices plans. The driver (simulator event loop or emulator loop) submits a plan
    when its first stage may start and learns its timing from the returned StepResult."""

    def execute(self, plan: BatchPlan, start_s: float) -> StepResult:
        """Run (or price) ``plan`` whose first stage may begin at ``start_s``."""
        ...
