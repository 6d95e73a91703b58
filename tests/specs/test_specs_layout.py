import pytest
from pydantic import ValidationError

from emulator.errors import LayoutError
from emulator.specs.layout import ParallelLayout, valid_tp
from emulator.specs.model import MODEL_PRESETS

M = MODEL_PRESETS


def test_rank_coords_round_trip_tp_innermost():
    layout = ParallelLayout(dp=2, pp=2, tp=2)
    assert layout.world_size == 8
    coords = [layout.rank_coords(r) for r in range(8)]
    assert coords == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1),
                      (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)]
    assert [layout.rank_of(*c) for c in coords] == list(range(8))
    with pytest.raises(ValueError, match="rank 8 out of range 0..7"):
        layout.rank_coords(8)
    with pytest.raises(ValueError, match="pp coordinate 2 out of range 0..1"):
        layout.rank_of(0, 2, 0)


def test_groups_per_axis():
    layout = ParallelLayout(dp=2, pp=2, tp=2)
    assert layout.groups("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout.groups("pp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert layout.groups("dp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert layout.groups("ep") == [[r] for r in range(8)]
    with pytest.raises(ValueError, match="unknown axis 'xp'"):
        layout.groups("xp")


def test_ep_groups_for_each_supported_grouping():
    assert ParallelLayout(dp=2, pp=2, tp=2, ep=2).groups("ep") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    spans = ParallelLayout(dp=2, pp=2, tp=2, ep=4)
    assert spans.ep_spans_stages
    assert spans.groups("ep") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    attn_dp = ParallelLayout(dp=2, pp=2, tp=2, ep=4, attention_dp=True)
    assert not attn_dp.ep_spans_stages
    assert attn_dp.groups("ep") == [[0, 1, 4, 5], [2, 3, 6, 7]]


@pytest.mark.parametrize("fields, match", [
    ({"tp": 2, "ep": 3}, "ep=3 is not supported with dp=1, tp=2, pp=1; use ep=1, ep=tp \\(2\\)"),
    ({"dp": 2, "tp": 2, "ep": 2, "attention_dp": True}, "attention_dp=True needs ep == dp\\*tp = 4"),
    ({"attention_dp": True}, "attention_dp=True needs ep == dp\\*tp = 1 > 1"),
    ({"tp": 0}, "tp"),
    ({"tp": 2, "xp": 2}, "xp"),
])
def test_unsupported_layouts_are_refused(fields, match):
    with pytest.raises(ValidationError, match=match):
        ParallelLayout(**fields)


def test_stage_layers_even_split_earlier_stages_larger():
    assert ParallelLayout(pp=4).stage_layers(M["llama-3.1-405b"]) == [
        (0, 32), (32, 64), (64, 95), (95, 126)]
    assert ParallelLayout(pp=4).stage_layers(M["deepseek-r1"]) == [
        (0, 16), (16, 31), (31, 46), (46, 61)]
    assert ParallelLayout(pp=4).stage_layers(M["tiny"]) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert ParallelLayout().stage_layers(M["tiny"]) == [(0, 4)]
    with pytest.raises(LayoutError, match="pp=5 exceeds num_layers=4 of tiny; use pp <= 4"):
        ParallelLayout(pp=5).stage_layers(M["tiny"])


@pytest.mark.parametrize("layout, model, message", [
    (ParallelLayout(tp=3), "llama-3.1-70b",
     "tp=3 does not divide num_attention_heads=64 of llama-3.1-70b; "
     "valid tp: 1, 2, 4, 8, 16, 32, 64"),
    (ParallelLayout(tp=5), "r1-distill-qwen-14b",
     "tp=5 neither divides nor is a multiple of num_kv_heads=8 of r1-distill-qwen-14b; "
     "valid tp: 1, 2, 4, 8, 40"),  # 40: each KV head on 5 ranks
    (ParallelLayout(pp=127), "llama-3.1-405b",
     "pp=127 exceeds num_layers=126 of llama-3.1-405b; use pp <= 126"),
    (ParallelLayout(tp=2, ep=2), "llama-3.1-8b",
     "ep=2 needs an MoE model but llama-3.1-8b is dense; use ep=1"),
    (ParallelLayout(dp=3, ep=3, attention_dp=True), "mixtral-8x7b",
     "ep=3 does not divide num_routed_experts=8 of mixtral-8x7b; valid ep: 1, 2, 4, 8"),
])
def test_validate_for_names_field_and_fix(layout, model, message):
    with pytest.raises(LayoutError) as info:
        layout.validate_for(M[model])
    assert str(info.value) == message


def test_validate_for_accepts_good_layouts():
    ParallelLayout(tp=16).validate_for(M["llama-3.1-70b"])  # KV heads replicated 2x
    ParallelLayout(tp=8, pp=2, ep=16).validate_for(M["deepseek-r1"])
    ParallelLayout(dp=2, tp=4, ep=8, attention_dp=True).validate_for(M["deepseek-r1"])


def test_valid_tp_ignores_kv_heads_for_mla():
    assert valid_tp(M["deepseek-r1"]) == [1, 2, 4, 8, 16, 32, 64, 128]
    assert valid_tp(M["qwen3-30b-a3b"]) == [1, 2, 4, 8, 16, 32]


def test_kv_heads_and_bytes_per_rank():
    llama70 = M["llama-3.1-70b"]
    assert ParallelLayout(tp=4).kv_heads_per_rank(llama70) == 2
    assert ParallelLayout(tp=8).kv_heads_per_rank(llama70) == 1
    assert ParallelLayout(tp=16).kv_heads_per_rank(llama70) == 1  # replicated
    assert ParallelLayout(tp=4).kv_bytes_per_token_per_layer_per_rank(llama70) == 2 * 2 * 128 * 2
    # MLA: the whole latent (512 + 64 elements) on every TP rank.
    assert ParallelLayout(tp=8).kv_heads_per_rank(M["deepseek-r1"]) == 1
    assert ParallelLayout(tp=8).kv_bytes_per_token_per_layer_per_rank(M["deepseek-r1"]) == 1152
