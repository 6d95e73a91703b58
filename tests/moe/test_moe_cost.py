"""MoE in the cost model and the simulator: busiest-rank pricing from the routing, EP fields
of StageWork, all-to-all bytes, MLA KV in the memory plan, and the MoE presets end to end."""

from __future__ import annotations

import numpy as np
import pytest

from emulator.build import build_run
from emulator.config import build_config
from emulator.core.plan import BatchPlan
from emulator.core.routing import RoutingSpec, sample_loads
from emulator.cost import CostModel
from emulator.cost.compute import RankShapes, Roofline, moe_fixed_time_s, routed_time_s
from emulator.metrics.moe import predicted_sync_wait_s
from emulator.simulator.run import simulate
from emulator.specs import ParallelLayout, get_hardware, get_model, plan_memory
from emulator.trace.io import write_trace
from emulator.trace.synth import synth_trace

MOE = get_model("tiny-moe")
H100 = get_hardware("h100")


def _decode(num: int, ctx: int = 100, step: int = 0) -> BatchPlan:
    return BatchPlan(replica=0, step=step, micro_batch=0, request_ids=[f"r{i}" for i in range(num)],
                     request_index=np.arange(num), num_new_tokens=np.ones(num, np.int64),
                     num_context_tokens=np.full(num, ctx, np.int64),
                     is_prefill=np.zeros(num, bool))


def _routing(ep: int, skew: str = "uniform", **kw) -> RoutingSpec:
    return RoutingSpec.make(num_experts=8, top_k=2, ep=ep, skew=skew, zipf_s=1.2, seed=0, **kw)


def test_busiest_rank_pricing_uses_the_sampled_routing():
    layout = ParallelLayout(tp=4, ep=4)
    spec = _routing(4, "zipf")
    cm = CostModel(MOE, H100, layout, routing=spec, dispatch_dtype_bytes=1)
    work = cm.step_work(_decode(24, step=5))
    (st,) = work.stages
    # 24 tokens <= 64: sampled exactly; 4096 / 48 pairs -> 32 samples.
    samples = sample_loads(spec, 24, 32)
    s, roof = RankShapes.of(MOE, 4, 4), Roofline.of(H100)
    times = [routed_time_s(s, roof, r.rank_tokens.astype(float),
                           r.rank_active_slots(4).astype(float)) for r in samples]
    busiest = float(np.mean([t.max() for t in times]))
    assert st.expert_compute_s.tolist() == pytest.approx([0.0, busiest, busiest, busiest],
                                                         rel=1e-12)
    fixed = moe_fixed_time_s(s, roof, 24) + roof.launch_s
    assert st.mlp_compute_s[1:] == pytest.approx([fixed + busiest] * 3, rel=1e-12)
    assert st.ep_layers.tolist() == [False, True, True, True]
    assert (st.routing, st.routing_replica, st.routing_step) == (spec, 0, 5)
    # fp8 dispatch rows are hidden x 1 B, combine rows hidden x 2 B.
    assert (st.dispatch_bytes_per_row, st.combine_bytes_per_row) == (256, 512)
    rows = np.mean([r.busiest_a2a_rows for r in samples])
    assert (st.ep_dispatch_bytes, st.ep_combine_bytes) == (int(rows * 256), int(rows * 512))
    assert st.expert_s_per_pair == s.expert_flops_per_pair / roof.flops_per_s
    assert st.expert_s_per_weight == s.expert_weight_bytes / roof.bytes_per_s
    # The all-to-all line prices dispatch + combine per MoE layer with those bytes.
    a2a = cm.profile.lookup("all_to_all", 4, "intra")
    uniform = CostModel(MOE, H100, layout, dispatch_dtype_bytes=1)
    _, comm, _ = cm.stage_times(work)
    _, comm_u, _ = uniform.stage_times(uniform.step_work(_decode(24)))
    a2a_u = uniform.step_work(_decode(24)).stages[0]
    expected = 3 * (2 * a2a.alpha_s + a2a.beta_s_per_byte * (rows * 768))
    got = comm[0] - (comm_u[0] - 3 * (2 * a2a.alpha_s + a2a.beta_s_per_byte * (
        a2a_u.ep_dispatch_bytes + a2a_u.ep_combine_bytes)))
    assert got == pytest.approx(expected, rel=1e-6)


def test_skew_raises_predicted_imbalance_and_eplb_lowers_it():
    layout = ParallelLayout(tp=4, ep=4)
    # 4096 tokens: the experts are compute-bound, so extra pairs on a rank cost time (at a
    # few hundred tokens reading the two local experts' weights dominates on every rank).
    load = {name: CostModel(MOE, H100, layout, routing=spec).moe_load(4096) for name, spec in (
        ("uniform", _routing(4)), ("zipf", _routing(4, "zipf")),
        ("eplb", _routing(4, "zipf", num_redundant=4)))}
    assert load["uniform"].imbalance < load["eplb"].imbalance < load["zipf"].imbalance
    assert load["zipf"].busiest_expert_s > 1.5 * load["uniform"].busiest_expert_s
    small = CostModel(MOE, H100, layout, routing=_routing(4, "zipf")).moe_load(256)
    assert small.busiest_expert_s == small.mean_expert_s  # weight reads: no imbalance cost
    for value in load.values():
        assert value.busiest_expert_s >= value.mean_expert_s
        assert predicted_sync_wait_s(value.busiest_expert_s, value.mean_expert_s) >= 0
    # Large counts are sampled at 4096 tokens and scaled linearly.
    cm = CostModel(MOE, H100, layout, routing=_routing(4))
    assert cm.moe_load(16384).busiest_a2a_rows == pytest.approx(
        4 * cm.moe_load(4096).busiest_a2a_rows)


def test_attention_dp_gathers_the_replicas_tokens():
    layout = ParallelLayout(dp=4, tp=1, ep=4, attention_dp=True)
    cm = CostModel(MOE, H100, layout, routing=_routing(4))
    assert cm.moe_load(10).num_group_tokens == 40
    st = cm.step_work(_decode(10)).stages[0]
    assert st.ep_dispatch_bytes == int(cm.moe_load(10).busiest_a2a_rows * 512)


def test_routing_must_match_the_model():
    with pytest.raises(ValueError, match="routing is for"):
        CostModel(MOE, H100, ParallelLayout(tp=2, ep=2), routing=_routing(4))


def test_mla_kv_bytes_in_the_memory_plan():
    r1 = get_model("deepseek-r1")
    # (kv_lora_rank 512 + rope 64) x 2 B per token per layer, not split by TP.
    assert r1.kv_bytes_per_token_per_layer == 1152
    for layout in (ParallelLayout(tp=8), ParallelLayout(tp=2, pp=4),
                   ParallelLayout(dp=8, ep=8, attention_dp=True)):
        plan = plan_memory(r1, get_hardware("h200"), layout)
        first, last = layout.stage_layers(r1)[0]
        assert plan.kv_bytes_per_block_per_rank == 16 * (last - first) * 1152
        assert plan.num_kv_blocks > 0
    assert RankShapes.of(r1, 8, 1).kv_bytes_per_token == 1152


@pytest.fixture(scope="module")
def small_trace(tmp_path_factory):
    path = tmp_path_factory.mktemp("moe-sim") / "t.arrow"
    write_trace(synth_trace(num_requests=12, lengths="uniform", arrival="batch",
                            prompt_tokens=(100, 400), output_tokens=(20, 60), seed=2), path)
    return path


@pytest.mark.parametrize("model, hardware, layout", [
    ("deepseek-r1", "h200", dict(tp=8)),
    ("deepseek-r1", "h200", dict(tp=2, pp=4)),
    ("deepseek-r1", "h200", dict(dp=8, tp=1, ep=8, attention_dp=True)),
    ("mixtral-8x7b", "h100", dict(tp=2, ep=2)),
    ("qwen3-30b-a3b", "h100", dict(tp=4, ep=4, expert_skew="zipf", zipf_s=1.0)),
])
def test_moe_presets_simulate(small_trace, model, hardware, layout):
    setup = build_run(build_config(trace=small_trace, model=model, hardware=hardware,
                                   **layout))
    tables = simulate(setup)
    finish = tables.requests["finish_s"].to_numpy()
    assert np.isfinite(finish).all() and (finish > 0).all()
    assert (setup.routing is not None) == (setup.layout.ep > 1)
