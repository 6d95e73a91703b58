import pytest

from emulator.errors import ConfigError, LayoutError
from emulator.specs.hardware import HARDWARE_PRESETS, HardwareSpec
from emulator.specs.layout import ParallelLayout
from emulator.specs.memory import (
    MemoryPlan, plan_memory, stage_kv_bytes_per_block, stage_weight_bytes)
from emulator.specs.model import MODEL_PRESETS

M, H = MODEL_PRESETS, HARDWARE_PRESETS

# A made-up 10 MB GPU (decimal bytes): 9,000,000 usable at gpu_memory_utilization=0.9.
SMALL = HardwareSpec(
    name="small", peak_flops_per_s=1e12, hbm_bytes=10_000_000, hbm_bytes_per_s=1e11,
    scale_up_bytes_per_s=1e10, scale_up_latency_s=1e-6, scale_out_bytes_per_s=1e9,
    scale_out_latency_s=5e-6, gpus_per_node=4)

# tiny (hidden 256, 8 heads of 32, 4 KV heads, MLP 512, vocab 1024, 4 layers, bf16) at tp=2:
# attention 2*256*128 (q, o) + 2*256*64 (k, v: 2 KV heads) = 98,304; norms 512;
# MLP 3*256*512/2 = 196,608 -> 295,424 parameters per layer, 2 layers per stage at pp=2.
STAGE0_BYTES = 2 * (2 * 295_424 + 512 * 256)  # + vocab-parallel embedding: 1,443,840
STAGE1_BYTES = 2 * (2 * 295_424 + 256 + 512 * 256)  # + final norm + LM head: 1,444,352
# KV per rank: 2 (K, V) x 2 heads x 32 x 2 B = 256 B per token per layer; 16 x 2 layers.
BLOCK_BYTES = 16 * 2 * 256  # 8,192


def test_tiny_plan_exact_block_counts():
    layout = ParallelLayout(tp=2, pp=2)
    assert stage_weight_bytes(M["tiny"], layout) == [1_443_840, 1_444_352]
    assert [STAGE0_BYTES, STAGE1_BYTES] == [1_443_840, 1_444_352]
    assert stage_kv_bytes_per_block(M["tiny"], layout, 16) == [BLOCK_BYTES, BLOCK_BYTES]
    # Reserve chosen so that the two stages differ: 9,000,000 - 1,002,500 = 7,997,500 B.
    # Stage 0: 7,997,500 - 1,443,840 = 6,553,660 -> 800 blocks (800 x 8,192 = 6,553,600).
    # Stage 1: 7,997,500 - 1,444,352 = 6,553,148 -> 799 blocks: the replica gets the min.
    plan = plan_memory(M["tiny"], SMALL, layout, activation_reserve_bytes=1_002_500)
    assert plan == MemoryPlan(
        weight_bytes_per_rank=1_444_352, kv_bytes_per_block_per_rank=8_192, num_kv_blocks=799,
        block_size=16, kv_capacity_tokens=799 * 16, available_kv_bytes_per_rank=6_553_148,
        activation_reserve_bytes=1_002_500)


def test_default_reserve_is_five_percent_of_hbm():
    # tp=1, pp=1: 4 x (196,608 + 512 + 393,216) + 2 x 262,144 + 256 = 2,885,888 params.
    plan = plan_memory(M["tiny"], SMALL, ParallelLayout(), block_size=32)
    assert plan.activation_reserve_bytes == 500_000
    assert plan.weight_bytes_per_rank == 5_771_776
    # 9,000,000 - 500,000 - 5,771,776 = 2,728,224 B; block: 32 x 4 layers x 512 B = 65,536.
    assert plan.available_kv_bytes_per_rank == 2_728_224
    assert (plan.kv_bytes_per_block_per_rank, plan.num_kv_blocks) == (65_536, 41)
    assert plan.kv_capacity_tokens == 41 * 32


def test_expert_placement_per_ep_grouping():
    moe = M["tiny-moe"]  # layer 0 dense, layers 1-3 MoE: 8 experts of 98,304, 1 shared
    attn_norm = 2 * (196_608 + 512)  # two layers per stage, tp=1
    embed = 1024 * 256
    # ep=1, pp=2: stage 0 holds layer 1's 8 experts, stage 1 those of layers 2 and 3.
    stage0 = attn_norm + 393_216 + (2048 + 98_304) + 8 * 98_304 + embed
    stage1 = attn_norm + 2 * (2048 + 98_304) + 16 * 98_304 + embed + 256
    assert stage_weight_bytes(moe, ParallelLayout(pp=2)) == [2 * stage0, 2 * stage1]
    # ep=tp*pp=2: every rank holds 4 experts of all three MoE layers.
    stage0 = attn_norm + 393_216 + (2048 + 98_304) + 12 * 98_304 + embed
    stage1 = attn_norm + 2 * (2048 + 98_304) + 12 * 98_304 + embed + 256
    assert stage_weight_bytes(moe, ParallelLayout(pp=2, ep=2)) == [2 * stage0, 2 * stage1]


def test_ep_equal_tp_holds_whole_experts():
    moe = M["tiny-moe"]
    # tp=2: attention 98,304 + norms 512 per layer; dense MLP 196,608; per MoE layer router
    # 2,048 + half the shared expert 49,152 + 4 whole experts (ep=2) or half of 8 (ep=1).
    per_rank = 4 * 98_816 + 196_608 + 3 * (2048 + 49_152 + 4 * 98_304) + 2 * 512 * 256 + 256
    assert stage_weight_bytes(moe, ParallelLayout(tp=2, ep=2)) == [2 * per_rank]
    assert stage_weight_bytes(moe, ParallelLayout(tp=2)) == [2 * per_rank]


def test_published_scale_plans():
    plan = plan_memory(M["llama-3.1-8b"], H["h100"], ParallelLayout())
    # 72e9 usable - 4e9 reserve - 16,060,522,496 weights; 16 x 131,072 B per block.
    assert plan.weight_bytes_per_rank == M["llama-3.1-8b"].weight_bytes
    assert plan.num_kv_blocks == (72_000_000_000 - 4_000_000_000 - 16_060_522_496) // 2_097_152
    # DeepSeek-R1 (FP8) fits one 8 x H200 node; its MLA latent is whole on every rank.
    r1 = plan_memory(M["deepseek-r1"], H["h200"], ParallelLayout(tp=8, ep=8))
    assert r1.kv_bytes_per_block_per_rank == 16 * 70_272
    assert 83e9 < r1.weight_bytes_per_rank < 86e9


def test_weights_too_large_suggest_smallest_tp():
    with pytest.raises(LayoutError) as info:
        plan_memory(M["llama-3.1-70b"], H["h100"], ParallelLayout(tp=2))
    assert str(info.value) == (
        "llama-3.1-70b needs 70.6 GB of weights per rank at tp=2 but h100 has 72.0 GB at "
        "gpu_memory_utilization=0.9 less 4.0 GB of activation reserve; "
        "the smallest tp that fits is 4")


def test_weights_too_large_suggest_pp_when_no_tp_in_node_fits():
    with pytest.raises(LayoutError) as info:
        plan_memory(M["llama-3.1-405b"], H["h100"], ParallelLayout(tp=4))
    assert str(info.value) == (
        "llama-3.1-405b needs 202.9 GB of weights per rank at tp=4 but h100 has 72.0 GB at "
        "gpu_memory_utilization=0.9 less 4.0 GB of activation reserve; "
        "no tp <= 8 fits; tp=8 with pp=2 fits")


def test_nothing_fits():
    with pytest.raises(LayoutError, match="no layout with tp <= 4 and pp <= 126 fits on small"):
        plan_memory(M["llama-3.1-405b"], SMALL, ParallelLayout(tp=4))


def test_less_than_one_block():
    # Weights 5,771,776 B; reserve leaves 9,000,000 - 3,200,000 - 5,771,776 = 28,224 B < 32,768.
    with pytest.raises(LayoutError) as info:
        plan_memory(M["tiny"], SMALL, ParallelLayout(), activation_reserve_bytes=3_200_000)
    assert str(info.value) == (
        "tiny at tp=1 leaves 28224 B per rank for KV cache on small, less than one block of "
        "32768 B (block_size=16); the smallest tp that fits is 2")


def test_invalid_layout_is_refused_before_planning():
    with pytest.raises(LayoutError, match="tp=3 does not divide"):
        plan_memory(M["tiny"], SMALL, ParallelLayout(tp=3))


@pytest.mark.parametrize("kwargs, match", [
    ({"gpu_memory_utilization": 0.0}, "gpu_memory_utilization=0.0 must be in \\(0, 1\\]"),
    ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization=1.5"),
    ({"block_size": 0}, "block_size=0 must be at least 1"),
    ({"activation_reserve_bytes": -1}, "activation_reserve_bytes=-1 must be >= 0"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        plan_memory(M["tiny"], SMALL, ParallelLayout(), **kwargs)
