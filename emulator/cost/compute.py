"""Roofline compute cost of one decoder layer on one rank (target seconds).

Every kernel group is priced by the roofline model (Williams, Waterman, Patterson, CACM 2009;
for LLM inference: Yuan et al., "LLM Inference Unveiled: Survey and Roofline Model
Insights", arXiv:2402.16363)::

    time = max(flops / (peak_flops_per_s * mfu), bytes / (hbm_bytes_per_s * mbu))

and a layer part (attention, MLP) adds ``launch_overhead_s`` once. Kernel groups are priced
separately and summed (a compute-bound GEMM cannot hide a memory-bound attention kernel):

- attention part = GEMMs (QKV + output projections: ``2 * T * params`` FLOPs over the T
  tokens of the step, weights read once per step) + the attention kernel (one varlen kernel
  over all requests, as vLLM v1's FlashAttention backend runs it);
- MLP part = dense SwiGLU GEMMs, or for MoE: router + shared experts GEMMs + routed experts
  (grouped GEMM).

Attention kernel. A chunk of ``new`` query tokens after ``ctx`` cached tokens attends
causally to ``pairs = new * ctx + new * (new + 1) / 2`` (query, key) pairs (decode: ctx + 1);
each pair costs ``2 * (d_qk + d_v)`` FLOPs per head (QK^T and PV; the "4 * n * d" of Kaplan
et al. 2020 / Vidur, Agrawal et al. MLSys 2024, with d_qk = d_v = head_dim). Bytes: the KV
cache rows read, ``(ctx + new) * kv_bytes_per_token_per_layer`` per request (FlashAttention
reads K/V once per query block; Kwon et al., "Efficient Memory Management for LLM Serving
with PagedAttention", SOSP 2023, for the paged KV layout). Activation bytes are ignored
(weights and KV dominate).

MLA (DeepSeek-V2 paper section 2.1; DeepSeek-V3 report; vLLM's MLA backend):
- decode uses the *absorbed* form: W_UK is folded into the query and W_UV applied after
  attention, so attention runs over the shared latent (MQA-like, one KV "head" of width
  kv_lora_rank + rope read once for all heads): per pair and head ``2 * (kv_lora_rank +
  rope)`` FLOPs for scores and ``2 * kv_lora_rank`` for the output. The absorbed matmuls cost
  exactly kv_b_proj's FLOPs per query token, so they sit in the GEMM term.
- prefill uses the non-absorbed form: per pair and head ``2 * (nope + rope + v)`` FLOPs, plus
  decompressing the cached context with kv_b_proj (``2 * ctx * kv_lora_rank * heads *
  (nope + v)`` FLOPs per prefill request).
- every TP rank holds (and reads) the full latent; heads are split by TP.

Weights per rank (vLLM's sharding): Q and output projections split by tp; K/V split by tp or
replicated when tp > num_kv_heads; MLA's down projections (q_a, kv_a) replicated, up
projections (q_b, kv_b) split; dense MLP split by tp; router replicated; shared experts split
by tp; routed experts split by tp when ep == 1, else ``E / ep`` whole experts per rank.
Norm weights and biases are ignored (< 0.1% of the bytes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class Efficiency(BaseModel):
    """Overrides for the hardware's default efficiencies (None keeps the hardware value)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mfu: float | None = Field(
        None, gt=0.0, le=1.0,
        description="Achieved fraction of peak FLOP/s (model FLOPs utilization); default: "
        "the hardware spec's mfu.")
    mbu: float | None = Field(
        None, gt=0.0, le=1.0,
        description="Achieved fraction of HBM bandwidth (model bandwidth utilization); "
        "default: the hardware spec's mbu.")
    launch_overhead_s: float | None = Field(
        None, ge=0.0,
        description="Fixed seconds added per layer part (attention, MLP) and per pre/post "
        "stage for kernel launches; default: the hardware spec's launch_overhead_s.")


@dataclass(frozen=True, slots=True)
class Roofline:
    """Effective machine rates after efficiency factors."""

    flops_per_s: float
    """peak_flops_per_s * mfu."""
    bytes_per_s: float
    """hbm_bytes_per_s * mbu."""
    launch_s: float
    """Launch overhead per layer part."""

    @classmethod
    def of(cls, hardware, efficiency: Efficiency | None = None) -> Roofline:
        eff = efficiency or Efficiency()
        mfu = hardware.mfu if eff.mfu is None else eff.mfu
        mbu = hardware.mbu if eff.mbu is None else eff.mbu
        launch = hardware.launch_overhead_s if eff.launch_overhead_s is None else eff.launch_overhead_s
        return cls(hardware.peak_flops_per_s * mfu, hardware.hbm_bytes_per_s * mbu, launch)

    def time_s(self, flops, num_bytes):
        """max(flops / rate, bytes / bandwidth); works elementwise on arrays."""
        if isinstance(flops, np.ndarray) or isinstance(num_bytes, np.ndarray):
            return np.maximum(flops / self.flops_per_s, num_bytes / self.bytes_per_s)
        # Plain numbers: Python's max is ~10x cheaper than a numpy ufunc call (hot path).
        return max(flops / self.flops_per_s, num_bytes / self.bytes_per_s)


def kv_heads_per_rank(model, tp: int) -> int:
    """KV heads each TP rank holds: split when tp divides them, replicated (1) beyond."""
    return max(1, model.num_kv_heads // tp)


@dataclass(frozen=True, slots=True)
class RankShapes:
    """Per-rank, per-layer constants derived once from (model, layout)."""

    attn_weight_bytes: float
    attn_gemm_flops_per_token: float
    attn_flops_per_pair_prefill: float
    """FLOPs per (query, key) pair, summed over this rank's heads, in prefill."""
    attn_flops_per_pair_decode: float
    mla_context_flops_per_token: float
    """MLA prefill: FLOPs to decompress one cached context token (0 otherwise)."""
    kv_bytes_per_token: float
    """KV bytes per token per layer held and read by this rank."""
    dense_weight_bytes: float
    dense_flops_per_token: float
    moe_fixed_weight_bytes: float
    """Router + shared experts on this rank."""
    moe_fixed_flops_per_token: float
    expert_weight_bytes: float
    """One routed expert's slice on this rank (whole expert with EP, 1/tp without)."""
    expert_flops_per_pair: float
    """FLOPs per (token, expert) pair on this rank."""
    num_experts: int
    num_local_experts: int
    top_k: int
    embed_bytes_per_token: float
    lm_head_weight_bytes: float
    lm_head_flops_per_token: float

    @classmethod
    def of(cls, model, tp: int, ep: int) -> RankShapes:
        h, nh, wb = model.hidden_size, model.num_attention_heads, model.weight_dtype_bytes
        heads = nh / tp
        if model.attention == "mla":
            nope, rope, v = model.qk_nope_head_dim, model.qk_rope_head_dim, model.v_head_dim
            lat = model.kv_lora_rank
            q = (h * model.q_lora_rank + model.q_lora_rank * heads * (nope + rope)
                 if model.q_lora_rank else h * heads * (nope + rope))
            attn_params = q + h * (lat + rope) + lat * heads * (nope + v) + heads * v * h
            per_pair_prefill = 2 * heads * (nope + rope + v)
            per_pair_decode = 2 * heads * ((lat + rope) + lat)
            ctx_flops = 2 * lat * heads * (nope + v)
            kv_bytes = (lat + rope) * model.kv_dtype_bytes
        else:
            d = model.head_dim
            kvh = kv_heads_per_rank(model, tp)
            attn_params = 2 * h * heads * d + 2 * h * kvh * d
            per_pair_prefill = per_pair_decode = 2 * heads * 2 * d
            ctx_flops = 0.0
            kv_bytes = 2 * kvh * d * model.kv_dtype_bytes
        dense = 3 * h * model.intermediate_size / tp
        width = tp if ep == 1 else 1
        expert = 3 * h * model.moe_intermediate_size / width
        fixed = h * model.num_routed_experts + model.num_shared_experts * 3 * h * model.moe_intermediate_size / tp
        return cls(
            attn_weight_bytes=attn_params * wb, attn_gemm_flops_per_token=2 * attn_params,
            attn_flops_per_pair_prefill=per_pair_prefill,
            attn_flops_per_pair_decode=per_pair_decode, mla_context_flops_per_token=ctx_flops,
            kv_bytes_per_token=kv_bytes, dense_weight_bytes=dense * wb,
            dense_flops_per_token=2 * dense, moe_fixed_weight_bytes=fixed * wb,
            moe_fixed_flops_per_token=2 * fixed, expert_weight_bytes=expert * wb,
            expert_flops_per_pair=2 * expert, num_experts=model.num_routed_experts,
            num_local_experts=model.num_routed_experts // ep if model.is_moe else 0,
            top_k=model.num_experts_per_tok, embed_bytes_per_token=h * model.dtype_bytes,
            lm_head_weight_bytes=model.vocab_size / tp * h * wb,
            lm_head_flops_per_token=2 * h * model.vocab_size / tp)


# --- layer parts ---------------------------------------------------------------------------
# Every function below takes aggregate loads (plain numbers, or arrays of them to price many
# steps at once) and returns seconds elementwise.

def attention_time_s(s: RankShapes, roof: Roofline, num_tokens, prefill_pairs, decode_pairs,
                     prefill_context_tokens, kv_tokens):
    """Attention part of one layer: QKV/O GEMMs + attention kernel + launch overhead.

    num_tokens: T, tokens computed in the step; prefill_pairs / decode_pairs: causal (query,
    key) pairs of prefill / decode requests; prefill_context_tokens: cached tokens of prefill
    requests (MLA decompression); kv_tokens: sum of (ctx + new), KV rows read.
    """
    gemm = roof.time_s(num_tokens * s.attn_gemm_flops_per_token,
                       s.attn_weight_bytes * (num_tokens > 0))
    flops = (prefill_pairs * s.attn_flops_per_pair_prefill
             + decode_pairs * s.attn_flops_per_pair_decode
             + prefill_context_tokens * s.mla_context_flops_per_token)
    kernel = roof.time_s(flops, kv_tokens * s.kv_bytes_per_token)
    return gemm + kernel + roof.launch_s


def dense_mlp_time_s(s: RankShapes, roof: Roofline, num_tokens):
    """Dense SwiGLU MLP of one layer (3 matrices of hidden x intermediate / tp)."""
    return roof.time_s(num_tokens * s.dense_flops_per_token, s.dense_weight_bytes) + roof.launch_s


def expected_distinct_experts(num_experts: int, top_k: int, num_local: int, num_tokens):
    """Expected number of a rank's ``num_local`` experts that at least one of ``num_tokens``
    tokens routes to, for uniform top-k routing: each expert is missed by one token with
    probability 1 - k/E, so E[distinct] = E_local * (1 - (1 - k/E)^T)."""
    return num_local * (1.0 - (1.0 - top_k / num_experts) ** num_tokens)


def moe_time_s(s: RankShapes, roof: Roofline, num_tokens, num_group_tokens, ep: int,
               expert_tokens: np.ndarray | None = None):
    """MoE MLP of one layer on the busiest rank: router + shared experts + routed experts.

    num_tokens: tokens of this rank's batch (router and shared experts run on them);
    num_group_tokens: tokens entering the expert-parallel group (equal to num_tokens unless
    attention is data-parallel); expert_tokens: optional int [num_routed_experts] real
    routing counts ((token, expert) pairs per expert in this layer), expert i on rank
    i // (E / ep); without it routing is uniform and the expectation is used.
    """
    fixed = moe_fixed_time_s(s, roof, num_tokens)
    if expert_tokens is None:
        pairs = num_group_tokens * s.top_k / ep
        distinct = expected_distinct_experts(s.num_experts, s.top_k, s.num_local_experts,
                                             num_group_tokens)
        routed = roof.time_s(pairs * s.expert_flops_per_pair, distinct * s.expert_weight_bytes)
    else:
        counts = np.asarray(expert_tokens, dtype=np.float64).reshape(-1, s.num_local_experts)
        pairs = counts.sum(axis=1)
        distinct = (counts > 0).sum(axis=1)
        routed = roof.time_s(pairs * s.expert_flops_per_pair,
                             distinct * s.expert_weight_bytes).max()
    return fixed + routed + roof.launch_s


def moe_fixed_time_s(s: RankShapes, roof: Roofline, num_tokens):
    """Router and shared experts of one MoE layer over this rank's tokens (no launch)."""
    return roof.time_s(num_tokens * s.moe_fixed_flops_per_token, s.moe_fixed_weight_bytes)


def routed_time_s(s: RankShapes, roof: Roofline, num_pairs, num_active_experts):
    """Routed experts on one rank as a grouped GEMM: ``num_pairs`` (token, expert) pairs
    over ``num_active_experts`` local experts whose weights are read (no launch)."""
    return roof.time_s(num_pairs * s.expert_flops_per_pair,
                       num_active_experts * s.expert_weight_bytes)


def embed_time_s(s: RankShapes, roof: Roofline, num_tokens):
    """Embedding lookup: read one row per token (no FLOPs)."""
    return roof.time_s(0.0, num_tokens * s.embed_bytes_per_token) + roof.launch_s


def lm_head_time_s(s: RankShapes, roof: Roofline, num_sampled):
    """LM head over the sampled positions only (vLLM computes logits at logits_indices):
    2 * num_sampled * hidden * vocab / tp FLOPs, vocab / tp * hidden weight bytes; sampling
    itself is covered by the launch overhead."""
    return (roof.time_s(num_sampled * s.lm_head_flops_per_token,
                        s.lm_head_weight_bytes * (num_sampled > 0))
            + roof.launch_s)
