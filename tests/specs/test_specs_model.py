import pytest
from pydantic import ValidationError

from emulator.errors import UserError
from emulator.specs.model import MODEL_PRESETS, ModelSpec, get_model

# Published sizes (model cards / papers), in parameters: (total, active or None).
PUBLISHED = {
    "llama-3.1-8b": (8.0e9, None),
    "llama-3.1-70b": (70.6e9, None),
    "llama-3.1-405b": (405e9, None),
    "r1-distill-qwen-14b": (14.8e9, None),
    "r1-distill-qwen-32b": (32.8e9, None),
    "deepseek-r1": (671e9, 37e9),
    "mixtral-8x7b": (46.7e9, 12.9e9),
    "qwen3-30b-a3b": (30.5e9, 3.3e9),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_counts_match_published_sizes(name):
    total, active = PUBLISHED[name]
    spec = MODEL_PRESETS[name]
    assert spec.total_params == pytest.approx(total, rel=0.03)
    if active is None:
        assert not spec.is_moe
        assert spec.active_params == spec.total_params
    else:
        assert spec.is_moe
        assert spec.active_params == pytest.approx(active, rel=0.03)


def test_kv_bytes_per_token_exact():
    # 126 layers x 2 (K and V) x 8 KV heads x 128 x 2 B.
    assert MODEL_PRESETS["llama-3.1-405b"].kv_bytes_per_token == 516_096
    # 61 layers x (512 latent + 64 RoPE key) x 2 B.
    assert MODEL_PRESETS["deepseek-r1"].kv_bytes_per_token_per_layer == 1152
    assert MODEL_PRESETS["deepseek-r1"].kv_bytes_per_token == 70_272
    assert MODEL_PRESETS["llama-3.1-8b"].kv_bytes_per_token == 32 * 2 * 8 * 128 * 2


def test_tiny_parameter_count_by_hand():
    tiny = MODEL_PRESETS["tiny"]
    # q and o: 256x256 each; k and v: 256x(4x32) each.
    assert tiny.attention_params_per_layer == 2 * 65536 + 2 * 32768
    assert tiny.dense_mlp_params_per_layer == 3 * 256 * 512
    per_layer = 196608 + 512 + 393216  # attention + two norms + MLP
    assert tiny.total_params == 4 * per_layer + 2 * 1024 * 256 + 256
    assert tiny.weight_bytes == 2 * 2_885_888


def test_tiny_moe_structure_and_counts_by_hand():
    moe = MODEL_PRESETS["tiny-moe"]
    assert moe.num_moe_layers == 3
    assert [moe.is_moe_layer(i) for i in range(4)] == [False, True, True, True]
    assert moe.expert_params == 3 * 256 * 128
    assert moe.moe_layer_params == 256 * 8 + 9 * 98304
    shared = 2 * 1024 * 256 + 256 + 4 * (196608 + 512) + 393216
    assert moe.total_params == shared + 3 * 886784
    assert moe.active_params == shared + 3 * (2048 + 3 * 98304)
    with pytest.raises(IndexError):
        moe.is_moe_layer(4)


def test_qkv_bias_counts_for_qwen2():
    biased = MODEL_PRESETS["r1-distill-qwen-14b"]
    unbiased = biased.model_copy(update={"attention_bias": False})
    assert biased.attention_params_per_layer - unbiased.attention_params_per_layer == 5120 + 2 * 1024


def test_fp8_weights_for_deepseek_and_default_weight_width():
    assert MODEL_PRESETS["deepseek-r1"].weight_dtype_bytes == 1
    assert MODEL_PRESETS["deepseek-r1"].weight_bytes == MODEL_PRESETS["deepseek-r1"].total_params
    assert MODEL_PRESETS["llama-3.1-8b"].weight_dtype_bytes == 2
    fp32 = MODEL_PRESETS["tiny"].model_dump() | {"dtype_bytes": 4, "weight_dtype_bytes": 0}
    assert ModelSpec(**fp32).weight_dtype_bytes == 4


def test_tied_embeddings_count_once():
    tiny = MODEL_PRESETS["tiny"]
    tied = tiny.model_copy(update={"tie_word_embeddings": True})
    assert tiny.embedding_params - tied.embedding_params == 1024 * 256


@pytest.mark.parametrize("update, match", [
    ({"attention": "mha"}, "num_kv_heads == num_attention_heads"),
    ({"num_kv_heads": 3}, "num_kv_heads=3 must divide"),
    ({"kv_lora_rank": 512}, "set attention='mla'"),
    ({"attention": "mla"}, "needs kv_lora_rank"),
    ({"num_experts_per_tok": 2}, "num_routed_experts=0"),
    ({"num_routed_experts": 4, "num_experts_per_tok": 5, "moe_intermediate_size": 8},
     "num_experts_per_tok=5 must be in 1..4"),
    ({"num_routed_experts": 4, "num_experts_per_tok": 1}, "moe_intermediate_size > 0"),
    ({"num_layers": 0}, "num_layers"),
])
def test_inconsistent_specs_are_refused(update, match):
    fields = MODEL_PRESETS["tiny"].model_dump() | update
    with pytest.raises(ValidationError, match=match):
        ModelSpec(**fields)


def test_specs_are_frozen_and_forbid_unknown_fields():
    with pytest.raises(ValidationError):
        MODEL_PRESETS["tiny"].num_layers = 8
    with pytest.raises(ValidationError, match="num_heads"):
        ModelSpec(**MODEL_PRESETS["tiny"].model_dump(), num_heads=8)


def test_get_model_presets_and_unknown():
    assert get_model("LLaMA-3.1-8B") is MODEL_PRESETS["llama-3.1-8b"]
    with pytest.raises(UserError, match="unknown model 'llama-9'; use one of llama-3.1-8b"):
        get_model("llama-9")


def test_get_model_reads_a_path(tmp_path):
    (tmp_path / "config.json").write_text(
        '{"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8, '
        '"num_key_value_heads": 4, "intermediate_size": 512, "vocab_size": 1024}')
    spec = get_model(str(tmp_path))
    assert spec.total_params == MODEL_PRESETS["tiny"].total_params
    with pytest.raises(UserError, match="no such file"):
        get_model(str(tmp_path / "missing" / "config.json"))
