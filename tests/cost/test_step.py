"""CostModel: plans to StepWork to stage times, against hand-computed values (toy hardware
of conftest.py: 1 TFLOP/s, 100 GB/s, scale-up 10 GB/s / 1 us, scale-out 1 GB/s / 10 us,
2 GPUs per node)."""

import numpy as np
import pytest

from emulator.core.plan import BatchPlan
from emulator.cost.compute import Efficiency, RankShapes, Roofline, attention_time_s, moe_time_s
from emulator.cost.step import CostModel, plan_latency_s
from emulator.errors import LayoutError
from emulator.specs.layout import ParallelLayout
from emulator.specs.model import ModelSpec


def make_plan(new, ctx, prefill) -> BatchPlan:
    num = len(new)
    return BatchPlan(replica=0, step=0, micro_batch=0, request_ids=[f"r{i}" for i in range(num)],
                     request_index=np.arange(num, dtype=np.int64),
                     num_new_tokens=np.asarray(new, dtype=np.int64),
                     num_context_tokens=np.asarray(ctx, dtype=np.int64),
                     is_prefill=np.asarray(prefill, dtype=bool))


DECODE4 = make_plan([1] * 4, [100] * 4, [False] * 4)


def test_decode_step_is_memory_bound(tiny, hw):
    cm = CostModel(tiny, hw, ParallelLayout())
    work = cm.step_work(DECODE4)
    (stage,) = work.stages
    assert (work.num_tokens, work.num_sampled_tokens) == (4, 4)
    assert stage.layer_ids.tolist() == [0, 1, 2, 3]
    # Attention: weights 393,216 B + KV 404 rows * 512 B, over 1e11 B/s.
    assert stage.attn_compute_s == pytest.approx([6.00064e-6] * 4, rel=1e-12)
    assert stage.mlp_compute_s == pytest.approx([7.86432e-6] * 4, rel=1e-12)  # 786,432 B
    assert stage.pre_compute_s == pytest.approx(2.048e-8, rel=1e-12)  # 4 rows of 512 B
    assert stage.post_compute_s == pytest.approx(5.24288e-6, rel=1e-12)  # LM head 524,288 B
    assert (stage.tp_allreduce_bytes, stage.embed_allreduce_bytes, stage.logits_gather_bytes,
            stage.pp_send_bytes) == (0, 0, 0, 0)
    compute, comm, p2p = cm.stage_times(work)
    assert compute == pytest.approx([6.07232e-5], rel=1e-12)
    assert comm.tolist() == [0.0] and p2p == 0.0


def test_prefill_step_is_compute_bound(tiny, hw):
    cm = CostModel(tiny, hw, ParallelLayout())
    (stage,) = cm.step_work(make_plan([2048], [0], [True])).stages
    # 2 * 2048 * 196,608 + (2048 * 2049 / 2) * 1,024 FLOPs at 1e12 FLOP/s.
    assert stage.attn_compute_s[0] == pytest.approx(2.953838592e-3, rel=1e-12)
    assert stage.mlp_compute_s[0] == pytest.approx(1.610612736e-3, rel=1e-12)


def test_efficiency_scales_compute(tiny, hw):
    slow = CostModel(tiny, hw, ParallelLayout(), efficiency=Efficiency(mbu=0.5))
    (stage,) = slow.step_work(DECODE4).stages
    assert stage.mlp_compute_s[0] == pytest.approx(2 * 7.86432e-6, rel=1e-12)


def test_num_sampled_from_prompt_tokens(tiny, hw):
    cm = CostModel(tiny, hw, ParallelLayout())
    # Two decodes, a prefill finishing its 30-token prompt, one with 50 of 100 tokens done.
    plan = make_plan([1, 1, 10, 20], [40, 50, 20, 30], [False, False, True, True])
    assert cm.step_work(plan).num_sampled_tokens == 4  # default: every prefill samples
    work = cm.step_work(plan, prompt_tokens=np.array([10, 10, 30, 100]))
    assert work.num_sampled_tokens == 3
    assert work.stages[0].post_compute_s == pytest.approx(524_288 / 1e11, rel=1e-12)


AR2_INTRA = 2e-6 + 2048 * 1e-10  # ring over 2 ranks: 2 * 1 us + 2 * 1/2 * 2048 B / 1e10


def test_tp_pp_collectives_and_placement(tiny, hw):
    # dp=1 tp=2 pp=2 on 2-GPU nodes: stage 0 = ranks 0, 1 (node 0), stage 1 = 2, 3 (node 1).
    cm = CostModel(tiny, hw, ParallelLayout(tp=2, pp=2))
    work = cm.step_work(DECODE4)
    s0, s1 = work.stages
    assert (s0.layer_ids.tolist(), s1.layer_ids.tolist()) == ([0, 1], [2, 3])
    act = 4 * 256 * 2
    assert (s0.tp_allreduce_bytes, s0.embed_allreduce_bytes, s0.pp_send_bytes) == (act, act, act)
    assert (s1.embed_allreduce_bytes, s1.pp_send_bytes) == (0, 0)
    assert s1.logits_gather_bytes == 4 * 512 * 2  # 4 samples x vocab / tp x 2 B
    _, comm, p2p = cm.stage_times(work)
    gather = 1e-6 + 8192 * 0.5e-10  # all_gather of the 8,192-byte output over 2 ranks
    assert comm == pytest.approx([5 * AR2_INTRA, 4 * AR2_INTRA + gather], rel=1e-12)
    assert p2p == pytest.approx(1e-5 + act / 1e9, rel=1e-12)  # the hop crosses nodes
    # Four GPUs per node: the hop stays on the scale-up link.
    _, _, p2p_intra = CostModel(tiny, hw.model_copy(update={"gpus_per_node": 4}),
                                ParallelLayout(tp=2, pp=2)).stage_times(work)
    assert p2p_intra == pytest.approx(1e-6 + act / 1e10, rel=1e-12)


def test_replica_placement_by_node_boundaries(tiny, hw):
    # 3 GPUs per node, dp=2 tp=2: replica 0 = ranks 0, 1 (node 0); replica 1 = 2, 3 (split).
    cm = CostModel(tiny, hw.model_copy(update={"gpus_per_node": 3}), ParallelLayout(dp=2, tp=2))
    work = cm.step_work(DECODE4)
    gather = 1e-6 + 8192 * 0.5e-10
    _, comm0, _ = cm.stage_times(work, replica=0)
    _, comm1, _ = cm.stage_times(work, replica=1)
    assert comm0 == pytest.approx([9 * AR2_INTRA + gather], rel=1e-12)
    ar_inter, gather_inter = 2e-5 + 2048 * 1e-9, 1e-5 + 8192 * 0.5e-9
    assert comm1 == pytest.approx([9 * ar_inter + gather_inter], rel=1e-12)


def test_moe_layers_and_expert_all_to_all(tiny_moe, hw):
    cm = CostModel(tiny_moe, hw, ParallelLayout(tp=2, ep=2))
    work = cm.step_work(DECODE4)
    (stage,) = work.stages
    s, roof = RankShapes.of(tiny_moe, 2, 2), Roofline.of(hw)
    dense = 3 * 256 * 512 / 2 * 2 / 1e11
    moe = moe_time_s(s, roof, 4, 4, 2)
    assert stage.mlp_compute_s == pytest.approx([dense, moe, moe, moe], rel=1e-12)
    # Expected dispatch per rank: 4 tokens / 2 ranks * top-2 * 1/2 remote * 512 B = 1,024 B.
    assert cm.ep_all_to_all_bytes(4) == 1024
    _, comm, _ = cm.stage_times(work)
    gather = 1e-6 + 8192 * 0.5e-10
    a2a = 1e-6 + 1024 / 1e10
    assert comm == pytest.approx([9 * AR2_INTRA + gather + 2 * 3 * a2a], rel=1e-12)
    # Real routing counts: all 8 pairs on expert 7 (rank 1) -> one expert read.
    counts = np.array([0, 0, 0, 0, 0, 0, 0, 8])
    routed = cm.step_work(DECODE4, expert_tokens=counts).stages[0].mlp_compute_s
    assert routed[1] == pytest.approx(moe_time_s(s, roof, 4, 4, 2, counts), rel=1e-12)
    per_layer = np.zeros((4, 8), dtype=np.int64)
    per_layer[1:, 0] = 8
    per_layer[3] = 1
    routed = cm.step_work(DECODE4, expert_tokens=per_layer).stages[0].mlp_compute_s
    assert routed[3] > routed[2] == routed[1]
    with pytest.raises(ValueError, match="expert_tokens"):
        cm.step_work(DECODE4, expert_tokens=np.zeros((2, 8)))


def test_mla_splits_prefill_and_decode_pairs(hw):
    mla = ModelSpec(
        name="tiny-mla", num_layers=2, hidden_size=256, num_attention_heads=8, num_kv_heads=8,
        head_dim=48, intermediate_size=512, vocab_size=1024, attention="mla", q_lora_rank=64,
        kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32)
    cm = CostModel(mla, hw, ParallelLayout())
    # A 5-token chunk after 10 cached tokens (65 pairs) and a decode at context 20 (21 pairs).
    attn = cm.step_work(make_plan([5, 1], [10, 20], [True, False])).stages[0].attn_compute_s
    expected = attention_time_s(RankShapes.of(mla, 1, 1), Roofline.of(hw), 6, 65, 21, 10, 36)
    assert attn == pytest.approx([expected] * 2, rel=1e-12)


@pytest.mark.parametrize("model_name, layout", [
    ("tiny", ParallelLayout()),
    ("tiny", ParallelLayout(tp=2, pp=2)),
    ("tiny-moe", ParallelLayout(tp=2, pp=2, ep=4)),
])
def test_decode_run_times_equals_step_loop(model_name, layout, hw, request):
    model = request.getfixturevalue(model_name.replace("-", "_"))
    # Realistic efficiencies so that both terms of the roofline matter.
    cm = CostModel(model, hw, layout,
                   efficiency=Efficiency(mfu=0.4, mbu=0.7, launch_overhead_s=3e-6))
    ctx0 = np.array([5, 300, 2000, 17, 64, 999])
    run = cm.decode_run_times(ctx0, 50)
    compute, comm, p2p = cm.decode_run_stage_times(ctx0, 50)
    assert run.shape == (50,) and compute.shape == comm.shape == (50, layout.pp)
    loop = []
    for step in range(50):
        plan = make_plan([1] * ctx0.size, ctx0 + step, [False] * ctx0.size)
        step_compute, step_comm, step_p2p = cm.stage_times(cm.step_work(plan))
        assert np.allclose(compute[step], step_compute, rtol=1e-12)
        assert np.allclose(comm[step], step_comm, rtol=1e-12) and step_p2p == p2p
        loop.append(plan_latency_s(step_compute, step_comm, step_p2p))
    assert np.allclose(run, loop, rtol=1e-12)
    assert run[-1] > run[0]  # contexts grow


def test_layout_checked_against_model(tiny, hw):
    with pytest.raises(LayoutError, match="tp=3"):
        CostModel(tiny, hw, ParallelLayout(tp=3))


def test_thermometer_probes_are_priced_in_every_stage(tiny, hw):
    # validate's thermometer: per stage one more all-reduce over TP of the step's
    # activations (a repeat of the stage's own); the transfers between stages are unchanged.
    layout = ParallelLayout(tp=2, pp=2)
    plain, probed = CostModel(tiny, hw, layout), CostModel(tiny, hw, layout, thermometer=True)
    w0, w1 = plain.step_work(DECODE4), probed.step_work(DECODE4)
    act = 4 * tiny.hidden_size * tiny.dtype_bytes
    assert [st.probe_bytes for st in w0.stages] == [0, 0]
    assert [st.probe_bytes for st in w1.stages] == [act, act]
    assert [st.tp_allreduce_bytes for st in w1.stages] == [act, act]
    c0, m0, p0 = plain.stage_times(w0)
    c1, m1, p1 = probed.stage_times(w1)
    ar = 2 * 1e-6 + act * (2 * 1 / 2) / 1e10  # ring all-reduce of 2 ranks on scale-up
    assert c1 == pytest.approx(c0)
    assert m1 - m0 == pytest.approx([ar, ar])
    assert p1 == p0
    assert probed.with_profile(probed.profile.scaled(2.0)).thermometer
    # each step's own size
    prefill = make_plan([12], [0], [True])
    assert [st.probe_bytes for st in probed.step_work(prefill).stages] == [
        12 * tiny.hidden_size * tiny.dtype_bytes] * 2
    # nothing to probe with a single rank
    assert CostModel(tiny, hw, ParallelLayout(), thermometer=True).step_work(
        DECODE4).stages[0].probe_bytes == 0
