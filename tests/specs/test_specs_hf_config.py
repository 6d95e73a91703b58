import json

import pytest

from emulator.errors import UserError
from emulator.specs.model import MODEL_PRESETS, from_hf_config

# Abridged copies of the published config.json files (the keys this reader uses plus a few
# it must ignore).
LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "intermediate_size": 14336, "vocab_size": 128256, "tie_word_embeddings": False,
    "attention_bias": False, "rope_theta": 500000.0, "torch_dtype": "bfloat16",
}
QWEN25_14B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 5120,
    "num_hidden_layers": 48, "num_attention_heads": 40, "num_key_value_heads": 8,
    "intermediate_size": 13824, "vocab_size": 152064, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "hidden_size": 7168, "num_hidden_layers": 61, "num_attention_heads": 128,
    "num_key_value_heads": 128, "intermediate_size": 18432, "vocab_size": 129280,
    "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128,
    "v_head_dim": 128, "n_routed_experts": 256, "n_shared_experts": 1,
    "num_experts_per_tok": 8, "moe_intermediate_size": 2048, "first_k_dense_replace": 3,
    "moe_layer_freq": 1, "num_nextn_predict_layers": 1, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]},
}
MIXTRAL = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4096,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "intermediate_size": 14336, "vocab_size": 32000, "num_local_experts": 8,
    "num_experts_per_tok": 2, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}
QWEN3_MOE = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
    "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4,
    "head_dim": 128, "intermediate_size": 6144, "vocab_size": 151936, "num_experts": 128,
    "num_experts_per_tok": 8, "moe_intermediate_size": 768, "decoder_sparse_step": 1,
    "mlp_only_layers": [], "attention_bias": False, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


def write(tmp_path, cfg, name="config.json"):
    path = tmp_path / name
    path.write_text(json.dumps(cfg) if isinstance(cfg, dict) else cfg)
    return path


@pytest.mark.parametrize("cfg, preset", [
    (LLAMA_8B, "llama-3.1-8b"), (QWEN25_14B, "r1-distill-qwen-14b"),
    (DEEPSEEK_V3, "deepseek-r1"), (MIXTRAL, "mixtral-8x7b"), (QWEN3_MOE, "qwen3-30b-a3b"),
])
def test_published_configs_reproduce_the_presets(tmp_path, cfg, preset):
    spec = from_hf_config(str(write(tmp_path, cfg)))
    expected = MODEL_PRESETS[preset].model_dump() | {"name": tmp_path.name}
    assert spec.model_dump() == expected


def test_name_from_config_and_folder_path(tmp_path):
    write(tmp_path, LLAMA_8B | {"_name_or_path": "meta-llama/Llama-3.1-8B"})
    assert from_hf_config(str(tmp_path)).name == "meta-llama/Llama-3.1-8B"


def test_mha_when_kv_heads_absent(tmp_path):
    cfg = {k: v for k, v in LLAMA_8B.items() if k != "num_key_value_heads"}
    spec = from_hf_config(str(write(tmp_path, cfg)))
    assert (spec.attention, spec.num_kv_heads, spec.head_dim) == ("mha", 32, 128)


def test_leading_mlp_only_layers_become_dense_layers(tmp_path):
    spec = from_hf_config(str(write(tmp_path, QWEN3_MOE | {"mlp_only_layers": [0, 1]})))
    assert spec.num_dense_layers == 2 and spec.num_moe_layers == 46


@pytest.mark.parametrize("cfg, match", [
    ("{not json", "not a readable JSON config"),
    ("[1, 2]", "expected a JSON object"),
    ({k: v for k, v in LLAMA_8B.items() if k != "vocab_size"}, "missing required key 'vocab_size'"),
    (LLAMA_8B | {"num_hidden_layers": "32"}, "key 'num_hidden_layers' must be an integer"),
    (LLAMA_8B | {"tie_word_embeddings": 1}, "key 'tie_word_embeddings' must be true or false"),
    (LLAMA_8B | {"torch_dtype": "int4"}, "key 'torch_dtype'='int4'"),
    (LLAMA_8B | {"num_hidden_layers": 0}, "num_layers: Input should be greater than 0"),
    ({k: v for k, v in DEEPSEEK_V3.items() if k != "v_head_dim"}, "missing required key 'v_head_dim'"),
    (QWEN3_MOE | {"mlp_only_layers": [3]}, "key 'mlp_only_layers'=\\[3\\] is not supported"),
    (QWEN3_MOE | {"decoder_sparse_step": 2}, "key 'decoder_sparse_step'"),
    (QWEN3_MOE | {"shared_expert_intermediate_size": 5632}, "shared_expert_intermediate_size"),
])
def test_malformed_configs_name_the_file_and_key(tmp_path, cfg, match):
    path = write(tmp_path, cfg)
    with pytest.raises(UserError, match=match) as info:
        from_hf_config(str(path))
    assert str(info.value).startswith(str(path))


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(UserError, match="config.json: no such file"):
        from_hf_config(str(tmp_path))
