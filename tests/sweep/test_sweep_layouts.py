"""Layout enumeration for a sweep: every valid (DP, TP, PP, EP) split of N GPUs, skipped ones
with the specs' reason; layout names round-trip."""

from __future__ import annotations

import pytest

from emulator.errors import ConfigError
from emulator.specs import ParallelLayout, get_hardware, get_model
from emulator.sweep.layouts import enumerate_layouts, layout_name, parse_layout

H200 = get_hardware("h200")


def _names(layouts):
    return sorted(layout_name(x) for x in layouts)


def test_dense_32b_on_8_h200_every_split_fits():
    valid, skipped = enumerate_layouts(get_model("r1-distill-qwen-32b"), H200, 8)
    assert _names(valid) == sorted(["dp8", "dp4-tp2", "dp4-pp2", "dp2-tp4", "dp2-tp2-pp2",
                                    "dp2-pp4", "tp8", "tp4-pp2", "tp2-pp4", "pp8"])
    assert skipped == []


def test_deepseek_r1_on_8_h200_ep_options_and_weight_skips():
    valid, skipped = enumerate_layouts(get_model("deepseek-r1"), H200, 8)
    assert _names(valid) == sorted([
        "pp8", "pp8-ep8", "tp2-pp4", "tp2-pp4-ep2", "tp2-pp4-ep8", "tp4-pp2", "tp4-pp2-ep4",
        "tp4-pp2-ep8", "tp8", "tp8-ep8", "dp2-pp4-ep2-adp", "dp2-tp2-pp2-ep4-adp",
        "dp2-tp4-ep8-adp", "dp4-pp2-ep4-adp", "dp4-tp2-ep8-adp", "dp8-ep8-adp"])
    assert {s.name for s in skipped} == {
        "dp2-pp4", "dp2-pp4-ep4", "dp2-tp2-pp2", "dp2-tp2-pp2-ep2", "dp2-tp2-pp2-ep4",
        "dp2-tp4", "dp2-tp4-ep4", "dp4-pp2", "dp4-pp2-ep2", "dp4-tp2", "dp4-tp2-ep2", "dp8"}
    assert all("GB of weights per rank" in s.reason for s in skipped)


def test_tp_beyond_one_node_is_skipped():
    valid, skipped = enumerate_layouts(get_model("llama-3.1-405b"), H200, 16,
                                       only=["tp16", "tp8-pp2"])
    assert _names(valid) == ["tp8-pp2"]
    assert [s.name for s in skipped] == ["tp16"]
    assert "exceeds the 8 GPUs of one h200 node" in skipped[0].reason


def test_given_layouts_are_checked():
    model = get_model("tiny-moe")
    valid, skipped = enumerate_layouts(model, H200, 4, only=["dp2-tp2-ep4-adp", "tp4-ep3"])
    assert _names(valid) == ["dp2-tp2-ep4-adp"]
    assert skipped[0].name == "tp4-ep3" and "ep=3 is not supported" in skipped[0].reason
    with pytest.raises(ConfigError, match="uses 2 GPUs, not --gpus 4"):
        enumerate_layouts(model, H200, 4, only=["tp2"])


@pytest.mark.parametrize("text, degrees", [
    ("dp2-tp4", {"dp": 2, "tp": 4}), ("TP8", {"tp": 8}), ("dp8xep8xadp",
                                                          {"dp": 8, "ep": 8, "attention_dp": True}),
    ("tp4_pp2.ep8", {"tp": 4, "pp": 2, "ep": 8})])
def test_parse_layout(text, degrees):
    assert parse_layout(text) == degrees
    layout = ParallelLayout(**degrees)
    assert parse_layout(layout_name(layout)) == degrees


@pytest.mark.parametrize("text", ["dp2-foo", "tp2-tp4", "", "tp0", "foo"])
def test_parse_layout_rejects(text):
    with pytest.raises(ConfigError, match="layout"):
        parse_layout(text)
