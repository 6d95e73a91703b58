"""Roofline parts against values computed by hand (toy hardware of conftest.py, tp = 1).

tiny, one layer, one rank:
- attention weights 2*256*256 + 2*256*(4*32) = 196,608 params = 393,216 bytes
- attention kernel: 2 * 8 heads * (32 + 32) = 1,024 FLOPs per (query, key) pair;
  KV 2 * 4 * 32 * 2 = 512 bytes per token
- MLP 3 * 256 * 512 = 393,216 params = 786,432 bytes
"""

import numpy as np
import pytest
from pydantic import ValidationError

from emulator.cost.compute import (Efficiency, RankShapes, Roofline, attention_time_s,
                                   dense_mlp_time_s, embed_time_s, expected_distinct_experts,
                                   lm_head_time_s, moe_time_s)
from emulator.specs.model import ModelSpec


def test_rank_shapes_of_tiny(tiny):
    s = RankShapes.of(tiny, tp=1, ep=1)
    assert s.attn_weight_bytes == 393_216
    assert s.attn_flops_per_pair_prefill == s.attn_flops_per_pair_decode == 1_024
    assert s.kv_bytes_per_token == 512
    assert s.dense_weight_bytes == 786_432
    s2 = RankShapes.of(tiny, tp=2, ep=1)
    assert s2.attn_weight_bytes == 393_216 / 2 and s2.kv_bytes_per_token == 256
    # tp = 8 > 4 kv heads: one kv head per rank, replicated.
    assert RankShapes.of(tiny, tp=8, ep=1).kv_bytes_per_token == 128


def test_decode_layer_is_memory_bound(tiny, hw):
    s, roof = RankShapes.of(tiny, 1, 1), Roofline.of(hw)
    # 4 decodes at context 100: T = 4, pairs = kv rows = 4 * 101 = 404.
    attn = attention_time_s(s, roof, 4, 0, 404, 0, 404)
    # GEMM: 393,216 B / 1e11 (vs 1.57e6 FLOPs / 1e12); kernel: 404 * 512 B / 1e11.
    assert attn == pytest.approx(3.93216e-6 + 2.06848e-6, rel=1e-12)
    assert dense_mlp_time_s(s, roof, 4) == pytest.approx(7.86432e-6, rel=1e-12)
    # LM head for 4 samples: 1024 * 256 * 2 B = 524,288 B read.
    assert lm_head_time_s(s, roof, 4) == pytest.approx(5.24288e-6, rel=1e-12)
    assert embed_time_s(s, roof, 4) == pytest.approx(4 * 512 / 1e11, rel=1e-12)


def test_prefill_layer_is_compute_bound(tiny, hw):
    s, roof = RankShapes.of(tiny, 1, 1), Roofline.of(hw)
    # One 2048-token prompt: pairs = 2048 * 2049 / 2 = 2,098,176.
    attn = attention_time_s(s, roof, 2048, 2_098_176, 0, 0, 2048)
    # 2 * 2048 * 196,608 FLOPs + 2,098,176 * 1,024 FLOPs at 1e12.
    assert attn == pytest.approx(8.05306368e-4 + 2.148532224e-3, rel=1e-12)
    assert dense_mlp_time_s(s, roof, 2048) == pytest.approx(1.610612736e-3, rel=1e-12)


def test_efficiency_overrides_hardware(hw):
    roof = Roofline.of(hw, Efficiency(mfu=0.5, launch_overhead_s=1e-5))
    assert (roof.flops_per_s, roof.bytes_per_s, roof.launch_s) == (5e11, 1e11, 1e-5)
    with pytest.raises(ValidationError):
        Efficiency(mbu=1.5)
    with pytest.raises(ValidationError):
        Efficiency(mfu_typo=0.5)


def test_launch_overhead_added_once_per_part(tiny, hw):
    s = RankShapes.of(tiny, 1, 1)
    base = Roofline.of(hw)
    slow = Roofline.of(hw, Efficiency(launch_overhead_s=1e-5))
    assert attention_time_s(s, slow, 4, 0, 404, 0, 404) == pytest.approx(
        attention_time_s(s, base, 4, 0, 404, 0, 404) + 1e-5)
    assert dense_mlp_time_s(s, slow, 4) == pytest.approx(dense_mlp_time_s(s, base, 4) + 1e-5)


def test_expected_distinct_experts():
    # 4 of 8 experts on the rank, top-2, 3 tokens: 4 * (1 - 0.75^3) = 2.3125.
    assert expected_distinct_experts(8, 2, 4, 3) == pytest.approx(2.3125, rel=1e-12)
    assert expected_distinct_experts(8, 2, 4, 0) == 0.0
    assert expected_distinct_experts(8, 2, 4, 10_000) == pytest.approx(4.0)


def test_moe_expected_and_real_routing(tiny_moe, hw):
    s, roof = RankShapes.of(tiny_moe, tp=2, ep=2), Roofline.of(hw)
    # ep = 2: 4 whole experts per rank (3 * 256 * 128 * 2 B = 196,608 B each); router
    # 256 * 8 params replicated, shared expert split by tp: (2,048 + 49,152) * 2 B = 102,400 B.
    assert (s.num_local_experts, s.expert_weight_bytes) == (4, 196_608)
    assert s.moe_fixed_weight_bytes == 102_400
    # 3 tokens, uniform: 2.3125 distinct experts per rank read, all memory-bound.
    fixed = 102_400 / 1e11
    assert moe_time_s(s, roof, 3, 3, 2) == pytest.approx(fixed + 2.3125 * 196_608 / 1e11)
    # Real routing: all 6 pairs on rank 1's experts 4, 5, 6 -> rank 1 reads 3 experts.
    counts = np.array([0, 0, 0, 0, 2, 2, 2, 0])
    assert moe_time_s(s, roof, 3, 3, 2, counts) == pytest.approx(fixed + 3 * 196_608 / 1e11)


def test_mla_absorbed_decode_and_latent_kv(hw):
    mla = ModelSpec(
        name="tiny-mla", num_layers=2, hidden_size=256, num_attention_heads=8, num_kv_heads=8,
        head_dim=48, intermediate_size=512, vocab_size=1024, attention="mla", q_lora_rank=64,
        kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32)
    s = RankShapes.of(mla, tp=2, ep=1)
    # The full latent (64 + 16) * 2 B on every TP rank; 4 heads per rank.
    assert s.kv_bytes_per_token == 160
    # Decode over the latent: 2 * 4 * ((64 + 16) + 64); prefill: 2 * 4 * (32 + 16 + 32).
    assert s.attn_flops_per_pair_decode == 1_152
    assert s.attn_flops_per_pair_prefill == 640
    # Decompressing one context token with kv_b_proj: 2 * 64 * 4 * (32 + 32).
    assert s.mla_context_flops_per_token == 32_768
    # Weights: q_a 256*64 + q_b 64*4*48 + kv_a 256*80 + kv_b 64*4*64 + o 4*32*256.
    assert s.attn_weight_bytes == 2 * (16_384 + 12_288 + 20_480 + 16_384 + 32_768)


def test_vectorised_over_steps(tiny, hw):
    s, roof = RankShapes.of(tiny, 1, 1), Roofline.of(hw)
    kv = np.array([404.0, 408.0])
    many = attention_time_s(s, roof, 4, 0, kv, 0, kv)
    assert many.shape == (2,)
    assert many[1] == attention_time_s(s, roof, 4, 0, 408, 0, 408)
