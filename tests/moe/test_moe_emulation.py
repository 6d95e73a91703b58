"""Expert parallelism in the emulator (Ray + gloo): tiny-moe with EP over the TP ranks.

Checked at EP=2 and EP=4: the split sizes every rank really passed to all_to_all_single
equal the routing counts computed here from the same seed (the spec rebuilt from the config
values, not taken from the run); tokens are conserved (every pair dispatched is computed
once and combined back to its token's rank); the recorded all-to-all bytes are the rows
sent to other ranks times hidden x bytes; moe.parquet rows agree with the routing.
"""

from __future__ import annotations

import numpy as np
import pytest

from emulator.build import build_run
from emulator.config import build_config
from emulator.core.routing import RoutingSpec, route
from emulator.errors import ConfigError
from emulator.runtime.cluster import WorkerGroup
from emulator.runtime.executor import Emulation
from emulator.specs import get_model
from emulator.trace.io import write_trace
from emulator.trace.synth import synth_trace

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]

MOE = get_model("tiny-moe")  # 4 layers, layer 0 dense; 8 experts, top-2, hidden 256
SEED = 7


@pytest.fixture(scope="module")
def batch_trace(tmp_path_factory):
    path = tmp_path_factory.mktemp("moe") / "batch.arrow"
    write_trace(synth_trace(num_requests=6, lengths="uniform", arrival="batch",
                            prompt_tokens=(10, 40), output_tokens=(2, 5), seed=3), path)
    return path


def _setup(trace, ep: int, **kw):
    cfg = build_config(trace=trace, model="tiny-moe", hardware="h100", tp=ep, ep=ep,
                       dilation=1.0, memory_scale=1e-3, timeout_s=10.0,
                       max_num_batched_tokens=256, expert_skew="zipf", zipf_s=1.2,
                       routing_seed=SEED, **kw)
    return build_run(cfg, record_slots=True)


def _emulate(setup):
    with WorkerGroup(setup.layout, backend="gloo", timeout_s=10.0) as group:
        emu = Emulation(setup, group)
        emu.allocate()
        emu.run()
        logs = group.get([a.ep_splits.remote() for a in group.actors], 10.0, "read splits")
    return emu, emu.tables(), logs


@pytest.mark.parametrize("ep, dispatch_dtype", [(2, "bf16"), (4, "fp8")])
def test_splits_equal_routing_and_tokens_are_conserved(batch_trace, ray_local, ep,
                                                       dispatch_dtype):
    setup = _setup(batch_trace, ep, dispatch_dtype=dispatch_dtype)
    emu, tables, logs = _emulate(setup)
    spec = RoutingSpec.make(num_experts=8, top_k=2, ep=ep, skew="zipf", zipf_s=1.2, seed=SEED)
    steps = tables.steps
    tokens = dict(zip(steps["step"].to_numpy().tolist(),
                      (steps["num_prefill_tokens"].to_numpy()
                       + steps["num_decode_tokens"].to_numpy()).tolist()))
    moe_layers = [1, 2, 3]
    # Every rank ran dispatch + combine for every MoE layer of every step, nothing else.
    for rank, log in enumerate(logs):
        assert [(e.step_key[1][0], e.layer) for e in log] == [
            (s, layer) for s in sorted(tokens) for layer in moe_layers]
    skewed = False
    for i, s in enumerate(sorted(tokens)):
        for j, layer in enumerate(moe_layers):
            expected = route(spec, replica=0, step=s, layer=layer, num_tokens=tokens[s])
            entries = [log[i * len(moe_layers) + j] for log in logs]
            for rank, e in enumerate(entries):
                assert e.dispatch_send == expected.dispatch[rank].tolist()
                assert e.dispatch_recv == expected.dispatch[:, rank].tolist()
                # Tensors as sized: dispatch in = rows sent, out = rows received; the
                # combine sends back exactly what was received, and gets its own rows back.
                assert e.dispatch_rows == (sum(e.dispatch_send), sum(e.dispatch_recv))
                assert e.combine_rows == (sum(e.dispatch_recv), sum(e.dispatch_send))
                assert e.expert_pairs == sum(e.dispatch_recv)
            pairs = tokens[s] * MOE.num_experts_per_tok
            assert sum(e.dispatch_rows[0] for e in entries) == pairs  # dispatched
            assert sum(e.expert_pairs for e in entries) == pairs      # computed once
            assert sum(e.combine_rows[1] for e in entries) == pairs   # combined
            skewed |= len({e.expert_pairs for e in entries}) > 1
    assert skewed  # Zipf routing really produced uneven splits

    # Collective records: 2 all-to-alls per MoE layer per rank on the ep axis; bytes =
    # rows sent to the other ranks x hidden x (1 fp8 | 2 bf16) for the dispatch, x 2 combine.
    col = tables.collectives
    op, axis = (col[c].to_numpy(zero_copy_only=False) for c in ("op", "axis"))
    a2a = op == "all_to_all"
    assert (axis[a2a] == "ep").all()
    assert set(col["group"].to_numpy(zero_copy_only=False)[a2a].tolist()) == {"ep/dp0/pp0"}
    assert a2a.sum() == 2 * len(moe_layers) * len(tokens) * ep
    b = 1 if dispatch_dtype == "fp8" else 2
    rank_col, step_col, layer_col = (col[c].to_numpy() for c in ("rank", "step", "layer"))
    nbytes = col["bytes"].to_numpy()
    for rank, log in enumerate(logs):
        for i, s in enumerate(sorted(tokens)):
            for j, layer in enumerate(moe_layers):
                e = log[i * len(moe_layers) + j]
                mine = a2a & (rank_col == rank) & (step_col == s) & (layer_col == layer)
                off = sum(e.dispatch_send) - e.dispatch_send[rank]
                assert nbytes[mine].tolist() == [off * MOE.hidden_size * b,
                                                 (sum(e.dispatch_recv) - e.dispatch_recv[rank])
                                                 * MOE.hidden_size * 2]

    moe = emu.moe_records.to_table()
    assert moe.num_rows == len(tokens) * len(moe_layers) * ep
    tokens_in = moe["tokens_in"].to_numpy()
    per_expert = moe["tokens_per_expert"].to_pylist()
    assert [sum(x) for x in per_expert] == tokens_in.tolist()
    first = route(spec, replica=0, step=0, layer=1, num_tokens=tokens[0])
    rows0 = (moe["step"].to_numpy() == 0) & (moe["layer"].to_numpy() == 1)
    assert tokens_in[rows0].tolist() == first.rank_tokens.tolist()
    assert moe["imbalance"].to_numpy()[rows0].tolist() == [first.imbalance] * ep
    assert (moe["a2a_sync_wait_s"].to_numpy() >= 0).all()


def test_emulate_rejects_ep_across_replicas(batch_trace):
    cfg = build_config(trace=batch_trace, model="tiny-moe", dp=2, tp=1, ep=2,
                       attention_dp=True)
    with pytest.raises(ConfigError, match="simulate"):
        build_run(cfg, record_slots=True)
    assert build_run(cfg).routing.ep == 2  # the simulator takes it


def test_no_routing_for_dense_or_ep1(batch_trace):
    cfg = build_config(trace=batch_trace, model="tiny-moe", tp=2)
    assert build_run(cfg).routing is None
    with pytest.raises(ConfigError, match="eplb_redundant_experts"):
        build_run(build_config(trace=batch_trace, model="tiny-moe", tp=2,
                               eplb_redundant_experts=2))
    assert np.isclose(build_run(build_config(trace=batch_trace, model="tiny-moe", tp=2, ep=2))
                      .routing.popularity, 1 / 8).all()
