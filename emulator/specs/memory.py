"""Memory plan: weight bytes per rank and how many KV-cache blocks fit, as a serving engine
computes them (vLLM: ``gpu_memory_utilization`` x HBM, minus weights and the activation peak,
divided by the bytes of one block).

Weights per rank (parameters x ``weight_dtype_bytes``):
- attention: Q and output projections split by tp; K/V projections hold the rank's KV heads
  (replicated when tp > num_kv_heads); MLA's down-projections (q_a, kv_a) are replicated,
  its up-projections and output split by tp (vLLM's DeepseekV2MLAAttention);
- dense MLP and shared experts split by tp; router and norms replicated;
- routed experts: split by tp when ep == 1, else num_routed_experts / ep whole experts per
  rank for each MoE layer its EP group serves (every MoE layer when ep == tp*pp);
- vocabulary-parallel embedding on the first stage and LM head (plus final norm) on the last,
  each ceil(vocab / tp) rows; a tied LM head is a second copy when pp > 1.

Default activation reserve: 5% of HBM (4 GB of an 80 GB GPU). vLLM profiles the peak of one
``max_num_batched_tokens`` forward pass instead; 5% covers the activations, CUDA graphs and
allocator slack of common settings (8192 batched tokens). Pass a value to override it.
"""

from __future__ import annotations

from dataclasses import dataclass

from emulator.errors import ConfigError, LayoutError
from emulator.specs.hardware import HardwareSpec
from emulator.specs.layout import ParallelLayout, valid_tp
from emulator.specs.model import ModelSpec

_GB = 1e9


@dataclass(frozen=True)
class MemoryPlan:
    """Per-rank memory budget of one DP replica (all replicas are identical)."""

    weight_bytes_per_rank: int
    """Weight bytes of the most loaded rank (max over stages)."""
    kv_bytes_per_block_per_rank: int
    """KV bytes one block takes on a rank, for all of that rank's layers (max over stages)."""
    num_kv_blocks: int
    """Blocks in the replica's pool: min over stages of available bytes // block bytes."""
    block_size: int
    """Tokens per block."""
    kv_capacity_tokens: int
    """num_kv_blocks x block_size: tokens the replica's KV cache holds."""
    available_kv_bytes_per_rank: int
    """Bytes left for KV cache on the most constrained rank (min over stages)."""
    activation_reserve_bytes: int
    """Bytes per rank held back for activations."""


def stage_weight_bytes(model: ModelSpec, layout: ParallelLayout) -> list[int]:
    """Weight bytes held by each TP rank of each pipeline stage."""
    ranges = layout.stage_layers(model)
    return [_stage_params(model, layout, stage, start, end) * model.weight_dtype_bytes
            for stage, (start, end) in enumerate(ranges)]


def stage_kv_bytes_per_block(model: ModelSpec, layout: ParallelLayout,
                             block_size: int) -> list[int]:
    """KV bytes of one block on a rank of each stage (its layers x its share of a token)."""
    per_layer = layout.kv_bytes_per_token_per_layer_per_rank(model)
    return [block_size * (end - start) * per_layer for start, end in layout.stage_layers(model)]


def plan_memory(model: ModelSpec, hardware: HardwareSpec, layout: ParallelLayout, *,
                gpu_memory_utilization: float = 0.9, block_size: int = 16,
                activation_reserve_bytes: int | None = None) -> MemoryPlan:
    """How many KV blocks each DP replica gets; LayoutError if weights or one block do not fit."""
    if not 0 < gpu_memory_utilization <= 1:
        raise ConfigError(f"gpu_memory_utilization={gpu_memory_utilization} must be in (0, 1]")
    if block_size < 1:
        raise ConfigError(f"block_size={block_size} must be at least 1 token")
    if activation_reserve_bytes is None:
        activation_reserve_bytes = hardware.hbm_bytes // 20
    if activation_reserve_bytes < 0:
        raise ConfigError(f"activation_reserve_bytes={activation_reserve_bytes} must be >= 0")
    layout.validate_for(model)
    plan = _plan(model, hardware, layout, gpu_memory_utilization, block_size,
                 activation_reserve_bytes)
    if plan.num_kv_blocks >= 1:
        return plan
    usable = int(hardware.hbm_bytes * gpu_memory_utilization)
    budget = usable - activation_reserve_bytes
    if plan.weight_bytes_per_rank > budget:
        problem = (f"{model.name} needs {plan.weight_bytes_per_rank / _GB:.1f} GB of weights per "
                   f"rank at {_describe(layout)} but {hardware.name} has {usable / _GB:.1f} GB "
                   f"at gpu_memory_utilization={gpu_memory_utilization}")
        if activation_reserve_bytes:
            problem += f" less {activation_reserve_bytes / _GB:.1f} GB of activation reserve"
    else:
        problem = (f"{model.name} at {_describe(layout)} leaves "
                   f"{max(plan.available_kv_bytes_per_rank, 0)} B per rank for KV cache on "
                   f"{hardware.name}, less than one block of {plan.kv_bytes_per_block_per_rank} "
                   f"B (block_size={block_size})")
    fix = _suggest(model, hardware, layout, gpu_memory_utilization, block_size,
                   activation_reserve_bytes)
    raise LayoutError(f"{problem}; {fix}")


def _plan(model: ModelSpec, hardware: HardwareSpec, layout: ParallelLayout, util: float,
          block_size: int, reserve: int) -> MemoryPlan:
    weights = stage_weight_bytes(model, layout)
    block_bytes = stage_kv_bytes_per_block(model, layout, block_size)
    usable = int(hardware.hbm_bytes * util)
    available = [usable - w - reserve for w in weights]
    num_blocks = max(0, min(a // b for a, b in zip(available, block_bytes)))
    return MemoryPlan(
        weight_bytes_per_rank=max(weights), kv_bytes_per_block_per_rank=max(block_bytes),
        num_kv_blocks=num_blocks, block_size=block_size,
        kv_capacity_tokens=num_blocks * block_size, available_kv_bytes_per_rank=min(available),
        activation_reserve_bytes=reserve)


def _stage_params(model: ModelSpec, layout: ParallelLayout, stage: int, start: int,
                  end: int) -> int:
    """Parameters on one TP rank of ``stage`` (layers ``start``..``end - 1``)."""
    tp, h = layout.tp, model.hidden_size
    num_layers = end - start
    num_moe = sum(model.is_moe_layer(i) for i in range(start, end))
    per_layer = _attention_params_per_rank(model, layout) + model.norm_params_per_layer
    params = num_layers * per_layer + (num_layers - num_moe) * model.dense_mlp_params_per_layer // tp
    if model.is_moe:
        shared = model.num_shared_experts * model.expert_params // tp
        params += num_moe * (model.router_params + shared)
        if layout.ep == 1:
            params += num_moe * model.num_routed_experts * model.expert_params // tp
        else:
            served = model.num_moe_layers if layout.ep_spans_stages else num_moe
            params += served * (model.num_routed_experts // layout.ep) * model.expert_params
    vocab_rows = -(-model.vocab_size // tp)  # ceil: vLLM pads the vocabulary per rank
    if stage == 0:
        params += vocab_rows * h
    if stage == layout.pp - 1:
        params += h  # final norm
        if not (model.tie_word_embeddings and layout.pp == 1):
            params += vocab_rows * h
    return params


def _attention_params_per_rank(model: ModelSpec, layout: ParallelLayout) -> int:
    tp, h = layout.tp, model.hidden_size
    if model.attention == "mla":
        replicated = h * (model.kv_lora_rank + model.qk_rope_head_dim) + model.kv_lora_rank
        if model.q_lora_rank:
            replicated += h * model.q_lora_rank + model.q_lora_rank
        return replicated + (model.attention_params_per_layer - replicated) // tp
    q_dim = model.num_attention_heads * model.head_dim // tp
    kv_dim = layout.kv_heads_per_rank(model) * model.head_dim
    bias = q_dim + 2 * kv_dim if model.attention_bias else 0
    return 2 * h * q_dim + 2 * h * kv_dim + bias


def _describe(layout: ParallelLayout) -> str:
    parts = [f"tp={layout.tp}"]
    if layout.pp > 1:
        parts.append(f"pp={layout.pp}")
    if layout.ep > 1:
        parts.append(f"ep={layout.ep}")
    return ", ".join(parts)


def _with(layout: ParallelLayout, tp: int, pp: int) -> ParallelLayout:
    """``layout`` at another tp/pp, keeping its EP grouping (ep = 1, tp, tp*pp or dp*tp)."""
    if layout.ep == 1:
        ep = 1
    elif layout.attention_dp:
        ep = layout.dp * tp
    elif layout.ep_spans_stages:
        ep = tp * pp
    else:
        ep = tp
    return ParallelLayout(**(layout.model_dump() | {"tp": tp, "pp": pp, "ep": ep}))


def _suggest(model: ModelSpec, hardware: HardwareSpec, layout: ParallelLayout, util: float,
             block_size: int, reserve: int) -> str:
    """The smallest larger tp (up to gpus_per_node) that fits, else the smallest larger pp."""
    def fits(candidate: ParallelLayout) -> bool:
        try:
            candidate.validate_for(model)
        except LayoutError:
            return False
        return _plan(model, hardware, candidate, util, block_size, reserve).num_kv_blocks >= 1

    tps = [tp for tp in valid_tp(model) if layout.tp < tp <= hardware.gpus_per_node]
    for tp in tps:
        if fits(_with(layout, tp, layout.pp)):
            return f"the smallest tp that fits is {tp}"
    tp = max(tps, default=layout.tp)
    for pp in range(layout.pp + 1, model.num_layers + 1):
        if fits(_with(layout, tp, pp)):
            return f"no tp <= {hardware.gpus_per_node} fits; tp={tp} with pp={pp} fits"
    return (f"no layout with tp <= {max(tp, hardware.gpus_per_node)} and pp <= "
            f"{model.num_layers} fits on {hardware.name}; use a larger GPU or lower precision")
