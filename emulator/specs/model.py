"""Model architecture: the shapes that decide FLOPs, weight bytes and KV-cache bytes.

A :class:`ModelSpec` holds exactly the Hugging Face config values that matter for serving
cost. Parameter counts assume the SwiGLU MLP (gate, up and down projections) used by every
preset, and *include* norm weights (two RMSNorms per layer, the final norm, MLA's two latent
norms); per-head QK norms (Qwen3, 2 x head_dim per layer) and DeepSeek-V3's per-expert router
bias are ignored (under 300 parameters per layer). Active parameters count the embedding
and LM head, the convention behind DeepSeek-V3's "37B activated" and Mixtral's "12.9B".
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from emulator.errors import UserError


class ModelSpec(BaseModel):
    """A decoder-only transformer (dense or MoE; MHA, GQA or MLA attention)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, description="Model id used in reports, e.g. llama-3.1-8b.")
    num_layers: int = Field(gt=0, description="Decoder layers (HF num_hidden_layers).")
    hidden_size: int = Field(gt=0, description="Residual stream width (HF hidden_size).")
    num_attention_heads: int = Field(gt=0, description="Query heads (HF num_attention_heads).")
    num_kv_heads: int = Field(
        gt=0, description="Key/value heads (HF num_key_value_heads); equal to the query heads "
        "for MHA and MLA.")
    head_dim: int = Field(
        gt=0, description="Query/key head width; MLA: qk_nope_head_dim + qk_rope_head_dim.")
    intermediate_size: int = Field(
        ge=0, description="Dense FFN width (HF intermediate_size); used by dense layers only.")
    vocab_size: int = Field(gt=0, description="Vocabulary size (HF vocab_size).")
    tie_word_embeddings: bool = Field(
        False, description="LM head shares the input embedding's weights.")
    attention: Literal["mha", "gqa", "mla"] = Field(
        description="Attention kind: mha (kv heads == heads), gqa (fewer kv heads) or mla "
        "(DeepSeek multi-head latent attention).")
    attention_bias: bool = Field(
        False, description="Q/K/V projections carry biases (Qwen2/Qwen2.5).")
    q_lora_rank: int = Field(0, ge=0, description="MLA query low-rank width; 0: full q_proj.")
    kv_lora_rank: int = Field(0, ge=0, description="MLA compressed KV latent width.")
    qk_rope_head_dim: int = Field(0, ge=0, description="MLA decoupled RoPE key width.")
    qk_nope_head_dim: int = Field(0, ge=0, description="MLA per-head non-RoPE query/key width.")
    v_head_dim: int = Field(0, ge=0, description="MLA per-head value width.")
    num_routed_experts: int = Field(0, ge=0, description="Routed experts per MoE layer; 0: dense.")
    num_shared_experts: int = Field(0, ge=0, description="Always-active shared experts per MoE layer.")
    num_experts_per_tok: int = Field(0, ge=0, description="Routed experts chosen per token (top-k).")
    moe_intermediate_size: int = Field(0, ge=0, description="FFN width of one expert.")
    num_dense_layers: int = Field(
        0, ge=0, description="Leading dense layers before the MoE layers (HF "
        "first_k_dense_replace, 3 for DeepSeek-V3).")
    dtype_bytes: int = Field(2, gt=0, description="Bytes per activation element (bf16: 2).")
    weight_dtype_bytes: int = Field(
        0, ge=0, description="Bytes per weight; 0 (default) means dtype_bytes. 1 for FP8 "
        "checkpoints such as DeepSeek-R1's.")
    kv_dtype_bytes: int = Field(2, gt=0, description="Bytes per KV-cache element.")

    @model_validator(mode="before")
    @classmethod
    def _default_weight_dtype(cls, data: Any) -> Any:
        # Resolve "same as dtype_bytes" once so every reader sees a concrete width.
        if isinstance(data, dict) and not data.get("weight_dtype_bytes"):
            data = {**data, "weight_dtype_bytes": data.get("dtype_bytes", 2)}
        return data

    @model_validator(mode="after")
    def _check_consistency(self) -> ModelSpec:
        mla = (self.kv_lora_rank, self.qk_rope_head_dim, self.qk_nope_head_dim, self.v_head_dim)
        if self.attention == "mla":
            if min(mla) == 0:
                raise ValueError(f"{self.name}: attention='mla' needs kv_lora_rank, "
                                 "qk_rope_head_dim, qk_nope_head_dim and v_head_dim > 0")
        elif max(mla) > 0 or self.q_lora_rank > 0:
            raise ValueError(f"{self.name}: MLA fields are set but attention="
                             f"'{self.attention}'; set attention='mla' or zero them")
        if self.attention == "mha" and self.num_kv_heads != self.num_attention_heads:
            raise ValueError(f"{self.name}: attention='mha' needs num_kv_heads == "
                             f"num_attention_heads={self.num_attention_heads}; use 'gqa'")
        if self.num_attention_heads % self.num_kv_heads:
            raise ValueError(f"{self.name}: num_kv_heads={self.num_kv_heads} must divide "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.is_moe:
            if not 1 <= self.num_experts_per_tok <= self.num_routed_experts:
                raise ValueError(f"{self.name}: num_experts_per_tok="
                                 f"{self.num_experts_per_tok} must be in 1.."
                                 f"{self.num_routed_experts} (num_routed_experts)")
            if self.moe_intermediate_size == 0:
                raise ValueError(f"{self.name}: an MoE model needs moe_intermediate_size > 0")
            if self.num_dense_layers >= self.num_layers:
                raise ValueError(f"{self.name}: num_dense_layers={self.num_dense_layers} "
                                 f"must be below num_layers={self.num_layers}")
        elif (self.num_shared_experts or self.num_experts_per_tok or self.num_dense_layers
              or self.moe_intermediate_size):
            raise ValueError(f"{self.name}: MoE fields are set but num_routed_experts=0; "
                             "set num_routed_experts or zero the MoE fields")
        if self.num_layers - self.num_moe_layers > 0 and self.intermediate_size == 0:
            raise ValueError(f"{self.name}: dense layers need intermediate_size > 0")
        return self

    # --- structure -------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.num_routed_experts > 0

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.num_dense_layers if self.is_moe else 0

    def is_moe_layer(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` (0-based) has experts instead of a dense MLP."""
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} out of range 0..{self.num_layers - 1}")
        return self.is_moe and layer >= self.num_dense_layers

    # --- parameter counts --------------------------------------------------------------
    @property
    def attention_params_per_layer(self) -> int:
        """Q, K, V and output projections (plus biases, or MLA's low-rank factors and norms)."""
        h, nh = self.hidden_size, self.num_attention_heads
        if self.attention == "mla":
            # DeepSeek-V2 paper, section 2.1: q = W_UQ (norm(W_DQ x)), [c_kv, k_rope] = W_DKV x,
            # [k_nope, v] = W_UKV norm(c_kv); HF DeepseekV3Attention has the same modules.
            qk = self.qk_nope_head_dim + self.qk_rope_head_dim
            if self.q_lora_rank:
                q = h * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * nh * qk
            else:
                q = h * nh * qk
            kv_a = h * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
            kv_b = self.kv_lora_rank * nh * (self.qk_nope_head_dim + self.v_head_dim)
            return q + kv_a + kv_b + nh * self.v_head_dim * h
        q_dim = nh * self.head_dim
        kv_dim = self.num_kv_heads * self.head_dim
        bias = q_dim + 2 * kv_dim if self.attention_bias else 0
        return 2 * h * q_dim + 2 * h * kv_dim + bias

    @property
    def norm_params_per_layer(self) -> int:
        """Input and post-attention RMSNorm weights (replicated on every TP rank)."""
        return 2 * self.hidden_size

    @property
    def dense_mlp_params_per_layer(self) -> int:
        """SwiGLU gate, up and down projections of a dense layer."""
        return 3 * self.hidden_size * self.intermediate_size

    @property
    def expert_params(self) -> int:
        """One routed expert (a SwiGLU MLP of width moe_intermediate_size)."""
        return 3 * self.hidden_size * self.moe_intermediate_size

    @property
    def router_params(self) -> int:
        """Gating matrix of an MoE layer (hidden x num_routed_experts)."""
        return self.hidden_size * self.num_routed_experts

    @property
    def moe_layer_params(self) -> int:
        """Router, all routed experts and the shared experts of one MoE layer."""
        if not self.is_moe:
            return 0
        return self.router_params + (self.num_routed_experts + self.num_shared_experts) * self.expert_params

    @property
    def embedding_params(self) -> int:
        """Input embedding plus the LM head unless tied."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    def _params(self, moe_layer: int) -> int:
        num_dense = self.num_layers - self.num_moe_layers
        return (self.embedding_params + self.hidden_size  # final norm
                + self.num_layers * (self.attention_params_per_layer + self.norm_params_per_layer)
                + num_dense * self.dense_mlp_params_per_layer
                + self.num_moe_layers * moe_layer)

    @property
    def total_params(self) -> int:
        return self._params(self.moe_layer_params)

    @property
    def active_params(self) -> int:
        """Parameters touched per token: top-k routed plus shared experts in MoE layers."""
        if not self.is_moe:
            return self.total_params
        active = self.num_experts_per_tok + self.num_shared_experts
        return self._params(self.router_params + active * self.expert_params)

    @property
    def weight_bytes(self) -> int:
        return self.total_params * self.weight_dtype_bytes

    # --- KV cache ------------------------------------------------------------------
    @property
    def kv_bytes_per_token_per_layer(self) -> int:
        """MHA/GQA: a K and a V row per KV head; MLA: the compressed latent plus the shared
        RoPE key (DeepSeek-V2 paper, table 1: (d_c + d_h^R) elements per token per layer)."""
        if self.attention == "mla":
            return (self.kv_lora_rank + self.qk_rope_head_dim) * self.kv_dtype_bytes
        return 2 * self.num_kv_heads * self.head_dim * self.kv_dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return self.kv_bytes_per_token_per_layer * self.num_layers


# --- presets ---------------------------------------------------------------------------
# Values from each model's Hugging Face config.json (the repository named in the comment).
MODEL_PRESETS: dict[str, ModelSpec] = {
    # meta-llama/Llama-3.1-8B: 8.03B parameters.
    "llama-3.1-8b": ModelSpec(
        name="llama-3.1-8b", num_layers=32, hidden_size=4096, num_attention_heads=32,
        num_kv_heads=8, head_dim=128, intermediate_size=14336, vocab_size=128256,
        attention="gqa"),
    # meta-llama/Llama-3.1-70B: 70.6B.
    "llama-3.1-70b": ModelSpec(
        name="llama-3.1-70b", num_layers=80, hidden_size=8192, num_attention_heads=64,
        num_kv_heads=8, head_dim=128, intermediate_size=28672, vocab_size=128256,
        attention="gqa"),
    # meta-llama/Llama-3.1-405B: 405.9B.
    "llama-3.1-405b": ModelSpec(
        name="llama-3.1-405b", num_layers=126, hidden_size=16384, num_attention_heads=128,
        num_kv_heads=8, head_dim=128, intermediate_size=53248, vocab_size=128256,
        attention="gqa"),
    # deepseek-ai/DeepSeek-R1-Distill-Qwen-14B (Qwen2.5-14B architecture, QKV biases): 14.8B.
    "r1-distill-qwen-14b": ModelSpec(
        name="r1-distill-qwen-14b", num_layers=48, hidden_size=5120, num_attention_heads=40,
        num_kv_heads=8, head_dim=128, intermediate_size=13824, vocab_size=152064,
        attention="gqa", attention_bias=True),
    # deepseek-ai/DeepSeek-R1-Distill-Qwen-32B (Qwen2.5-32B architecture): 32.8B.
    "r1-distill-qwen-32b": ModelSpec(
        name="r1-distill-qwen-32b", num_layers=64, hidden_size=5120, num_attention_heads=40,
        num_kv_heads=8, head_dim=128, intermediate_size=27648, vocab_size=152064,
        attention="gqa", attention_bias=True),
    # deepseek-ai/DeepSeek-R1 (DeepSeek-V3 architecture): 671B total, 37B active, without
    # the multi-token-prediction module. The checkpoint is FP8 (e4m3, 128x128 block scales,
    # its quantization_config), hence 1-byte weights; activations and KV stay bf16.
    "deepseek-r1": ModelSpec(
        name="deepseek-r1", num_layers=61, hidden_size=7168, num_attention_heads=128,
        num_kv_heads=128, head_dim=192, intermediate_size=18432, vocab_size=129280,
        attention="mla", q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64,
        qk_nope_head_dim=128, v_head_dim=128, num_routed_experts=256, num_shared_experts=1,
        num_experts_per_tok=8, moe_intermediate_size=2048, num_dense_layers=3,
        weight_dtype_bytes=1),
    # mistralai/Mixtral-8x7B-v0.1: 46.7B total, 12.9B active.
    "mixtral-8x7b": ModelSpec(
        name="mixtral-8x7b", num_layers=32, hidden_size=4096, num_attention_heads=32,
        num_kv_heads=8, head_dim=128, intermediate_size=14336, vocab_size=32000,
        attention="gqa", num_routed_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=14336),
    # Qwen/Qwen3-30B-A3B: 30.5B total, 3.3B active; every layer is MoE (mlp_only_layers=[]),
    # so the config's intermediate_size=6144 is unused.
    "qwen3-30b-a3b": ModelSpec(
        name="qwen3-30b-a3b", num_layers=48, hidden_size=2048, num_attention_heads=32,
        num_kv_heads=4, head_dim=128, intermediate_size=6144, vocab_size=151936,
        attention="gqa", num_routed_experts=128, num_experts_per_tok=8,
        moe_intermediate_size=768),
    # Small made-up models for fast CPU tests.
    "tiny": ModelSpec(
        name="tiny", num_layers=4, hidden_size=256, num_attention_heads=8, num_kv_heads=4,
        head_dim=32, intermediate_size=512, vocab_size=1024, attention="gqa"),
    "tiny-moe": ModelSpec(
        name="tiny-moe", num_layers=4, hidden_size=256, num_attention_heads=8, num_kv_heads=4,
        head_dim=32, intermediate_size=512, vocab_size=1024, attention="gqa",
        num_routed_experts=8, num_shared_experts=1, num_experts_per_tok=2,
        moe_intermediate_size=128, num_dense_layers=1),
}


def from_hf_config(path: str) -> ModelSpec:
    """Read a local Hugging Face ``config.json`` (or a folder holding one); never the network."""
    from emulator.specs.hf_config import read_hf_config  # hf_config imports this module

    return read_hf_config(path)


def get_model(name_or_path: str) -> ModelSpec:
    """A preset by id, or a model read from a local HF config.json path."""
    spec = MODEL_PRESETS.get(name_or_path.lower())
    if spec is not None:
        return spec
    # Decide by the string alone: this layer touches files only inside from_hf_config.
    if name_or_path.endswith(".json") or "/" in name_or_path or "\\" in name_or_path:
        return from_hf_config(name_or_path)
    raise UserError(f"unknown model {name_or_path!r}; use one of {', '.join(MODEL_PRESETS)} "
                    "or a path to a Hugging Face config.json (e.g. ./my-model/config.json)")
