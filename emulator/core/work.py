"""What each rank of a pipeline stage does for one plan: the cost model fills it, the Ray
workers execute it (delays + real collectives), the simulator sums it.

Compute times are *target* seconds; a worker sleeps ``compute_s * dilation``. Byte counts
are the real sizes of the tensors that cross the wire (tokens x hidden x bytes per element).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from emulator.core.routing import RoutingSpec


@dataclass(slots=True)
class StageWork:
    """Work of one pipeline stage for one plan; every TP rank of the stage does the same."""

    stage: int
    """Pipeline stage index (0..pp-1)."""
    layer_ids: np.ndarray
    """int64 [L]: global indices of the decoder layers this stage runs, in order."""
    attn_compute_s: np.ndarray
    """float64 [L]: per layer, compute before the first TP all-reduce (norm, QKV, attention,
    output projection), target seconds on each rank."""
    mlp_compute_s: np.ndarray
    """float64 [L]: per layer, compute of the MLP (dense) or experts (MoE) before the second
    TP all-reduce, target seconds on each rank."""
    tp_allreduce_bytes: int
    """Bytes of each per-layer TP all-reduce (num_tokens x hidden x dtype bytes). Two per
    layer (after attention output and after the MLP down projection); 0 when tp == 1."""
    pre_compute_s: float = 0.0
    """Stage 0 only: embedding lookup; target seconds."""
    embed_allreduce_bytes: int = 0
    """Stage 0 only: the vocabulary-parallel embedding's all-reduce (tokens x hidden x bytes);
    0 when tp == 1 or on other stages."""
    post_compute_s: float = 0.0
    """Last stage only: final norm, LM head and sampling; target seconds."""
    logits_gather_bytes: int = 0
    """Last stage only: per rank, bytes of the logits shard gathered across TP for sampling
    (sampled tokens x vocab / tp x dtype bytes); 0 when tp == 1 or on other stages."""
    pp_send_bytes: int = 0
    """Bytes of the activations sent to the next stage (num_tokens x hidden x dtype bytes);
    0 on the last stage."""
    probe_bytes: int = 0
    """Thermometer probe (``emulator validate``; 0 = none; tp > 1 only): an all-reduce of
    this many bytes over TP right after the middle layer's first all-reduce, back to back, so
    it measures the host's collective speed during the run. The cost model makes it that
    all-reduce's size (``tp_allreduce_bytes``): the worker then runs it on the same buffer
    view, as the host probes do (runtime.groups.TimedCollectives.buffer)."""
    # --- expert parallelism (MoE layers with ep > 1); defaults mean "no EP" -------------
    ep_layers: np.ndarray | None = None
    """bool [L] or None: layers that dispatch their tokens to experts with an all-to-all
    (MoE layers when ep > 1). On those, ``mlp_compute_s`` is the router + shared experts +
    ``expert_compute_s``, and a rank runs: sleep(mlp - expert), dispatch all-to-all,
    sleep(its own expert time), combine all-to-all."""
    expert_compute_s: np.ndarray | None = None
    """float64 [L] or None: the routed-expert part of ``mlp_compute_s`` predicted for the
    busiest EP rank (0 on other layers); target seconds."""
    expert_s_per_pair: float = 0.0
    """Roofline compute term of one (token, expert) pair on a rank, target seconds: a rank
    with n pairs over a active local experts computes max(n * this, a * expert_s_per_weight)."""
    expert_s_per_weight: float = 0.0
    """Time to read one local expert's weights, target seconds (the roofline memory term)."""
    dispatch_bytes_per_row: int = 0
    """Bytes of one dispatched (token, expert) row: hidden x dispatch dtype bytes (2 bf16,
    1 fp8)."""
    combine_bytes_per_row: int = 0
    """Bytes of one combined row: hidden x 2 (bf16)."""
    ep_dispatch_bytes: int = 0
    """Predicted busiest-rank bytes of one dispatch all-to-all (cost convention: sent to or
    received from other ranks); the simulator prices the all-to-all with it."""
    ep_combine_bytes: int = 0
    """As ep_dispatch_bytes, for the combine all-to-all."""
    routing: RoutingSpec | None = None
    """How tokens pick experts (core.routing); the workers route with it."""
    routing_replica: int = 0
    """DP replica of the plan (routing seed component)."""
    routing_step: int = 0
    """Step of the plan within its replica (routing seed component)."""

    @property
    def num_ep_layers(self) -> int:
        return 0 if self.ep_layers is None else int(self.ep_layers.sum())

    @property
    def compute_s(self) -> float:
        """Total compute of the stage in target seconds."""
        return float(self.attn_compute_s.sum() + self.mlp_compute_s.sum()
                     + self.pre_compute_s + self.post_compute_s)


@dataclass(slots=True)
class StepWork:
    """All stages' work for one plan."""

    stages: list[StageWork]
    num_tokens: int
    """Tokens computed in the step (the activation rows that move)."""
    num_sampled_tokens: int
    """Sequences that sample a token this step (decodes and prefills that finish)."""
