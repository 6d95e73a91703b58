"""Read a local Hugging Face ``config.json`` into a :class:`ModelSpec` (never the network).

Understood architectures: Llama (LlamaForCausalLM), Qwen2/Qwen2.5, Mixtral, Qwen3-MoE and
DeepSeek-V2/V3. This is the only function of the specs layer that touches a file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from emulator.errors import UserError
from emulator.specs.model import ModelSpec

# HF ``torch_dtype`` -> bytes per element.
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}

# Spellings of the routed-expert count: DeepSeek, Mixtral, Qwen3-MoE.
_EXPERT_KEYS = ("n_routed_experts", "num_local_experts", "num_experts")


def read_hf_config(path: str | Path) -> ModelSpec:
    """Build a ModelSpec from ``path`` (a config.json, or a folder holding one).

    Raises UserError naming the file and the key when the file is missing, is not JSON,
    lacks a required key, or describes a layer pattern this emulator cannot represent.
    """
    file = Path(path)
    if file.is_dir():
        file = file / "config.json"
    try:
        cfg = json.loads(file.read_text())
    except FileNotFoundError:
        raise UserError(f"{file}: no such file; pass a model preset or a Hugging Face "
                        "config.json path") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{file}: not a readable JSON config ({exc})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{file}: expected a JSON object at the top level")
    reader = _Reader(file, cfg)
    try:
        return ModelSpec(**_spec_fields(reader, default_name=file.resolve().parent.name))
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "config"
        raise UserError(f"{file}: {where}: {err['msg']}") from None


class _Reader:
    """Typed key access that reports the file and key on a missing or mistyped value."""

    def __init__(self, file: Path, cfg: dict[str, Any]) -> None:
        self.file, self.cfg = file, cfg

    def int(self, key: str, default: int | None = None) -> int:
        value = self.cfg.get(key)
        if value is None:  # absent, or null (e.g. DeepSeek-V2-Lite's q_lora_rank)
            if default is None:
                raise UserError(f"{self.file}: missing required key {key!r}")
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{self.file}: key {key!r} must be an integer, got {value!r}")
        return value

    def bool(self, key: str, default: bool) -> bool:
        value = self.cfg.get(key, default)
        if not isinstance(value, bool):
            raise UserError(f"{self.file}: key {key!r} must be true or false, got {value!r}")
        return value


def _spec_fields(r: _Reader, *, default_name: str) -> dict[str, Any]:
    cfg = r.cfg
    hidden = r.int("hidden_size")
    heads = r.int("num_attention_heads")
    fields: dict[str, Any] = {
        "name": str(cfg.get("_name_or_path") or default_name),
        "num_layers": r.int("num_hidden_layers"),
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_kv_heads": r.int("num_key_value_heads", heads),
        "intermediate_size": r.int("intermediate_size"),
        "vocab_size": r.int("vocab_size"),
        "tie_word_embeddings": r.bool("tie_word_embeddings", False),
        # Qwen2's attention has Q/K/V biases hard-wired and no attention_bias key.
        "attention_bias": r.bool("attention_bias", cfg.get("model_type") == "qwen2"),
    }
    dtype = cfg.get("torch_dtype", "bfloat16")
    if dtype not in _DTYPE_BYTES:
        raise UserError(f"{r.file}: key 'torch_dtype'={dtype!r} is not one of "
                        f"{', '.join(_DTYPE_BYTES)}")
    fields["dtype_bytes"] = _DTYPE_BYTES[dtype]
    quant = cfg.get("quantization_config")
    if isinstance(quant, dict) and quant.get("quant_method") == "fp8":
        fields["weight_dtype_bytes"] = 1

    if r.int("kv_lora_rank", 0) > 0:
        nope, rope = r.int("qk_nope_head_dim"), r.int("qk_rope_head_dim")
        fields.update(attention="mla", num_kv_heads=heads, head_dim=nope + rope,
                      q_lora_rank=r.int("q_lora_rank", 0), kv_lora_rank=r.int("kv_lora_rank"),
                      qk_rope_head_dim=rope, qk_nope_head_dim=nope,
                      v_head_dim=r.int("v_head_dim"))
    else:
        if "head_dim" not in cfg and (heads <= 0 or hidden % heads):
            raise UserError(f"{r.file}: key 'num_attention_heads'={heads} must divide "
                            f"hidden_size={hidden} when 'head_dim' is absent")
        fields["head_dim"] = r.int("head_dim", hidden // max(heads, 1))
        fields["attention"] = "mha" if fields["num_kv_heads"] == heads else "gqa"

    expert_key = next((k for k in _EXPERT_KEYS if cfg.get(k)), None)
    if expert_key is not None:
        if cfg.get("shared_expert_intermediate_size"):
            raise UserError(f"{r.file}: key 'shared_expert_intermediate_size' (a shared expert "
                            "wider than the routed ones, Qwen2-MoE) is not supported")
        fields.update(
            num_routed_experts=r.int(expert_key),
            num_shared_experts=r.int("n_shared_experts", 0),
            num_experts_per_tok=r.int("num_experts_per_tok"),
            # Mixtral has no separate expert width: its experts use intermediate_size.
            moe_intermediate_size=r.int("moe_intermediate_size", fields["intermediate_size"]),
            num_dense_layers=_num_dense_layers(r, fields["num_layers"]),
        )
    return fields


def _num_dense_layers(r: _Reader, num_layers: int) -> int:
    """Leading dense layers; other dense-layer patterns are refused, not approximated."""
    if "first_k_dense_replace" in r.cfg:
        if r.int("moe_layer_freq", 1) != 1:
            raise UserError(f"{r.file}: key 'moe_layer_freq' other than 1 is not supported")
        return r.int("first_k_dense_replace")
    if r.int("decoder_sparse_step", 1) != 1:
        raise UserError(f"{r.file}: key 'decoder_sparse_step' other than 1 is not supported "
                        "(only leading dense layers are)")
    dense = r.cfg.get("mlp_only_layers") or []
    if dense != list(range(len(dense))) or len(dense) >= num_layers:
        raise UserError(f"{r.file}: key 'mlp_only_layers'={dense} is not supported: only "
                        "leading dense layers [0, 1, ..., k-1] are")
    return len(dense)
