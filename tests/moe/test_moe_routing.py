"""The pure routing module: gating against a loop-by-loop reference, determinism, skew
semantics, dispatch matrix, EPLB placement."""

from __future__ import annotations

import numpy as np
import pytest

from emulator.core.routing import (GATE_DIM, RoutingSpec, gumbel_of, place_experts,
                                   popularity_vector, route, router_weight, sample_loads)
from emulator.errors import ConfigError


def _reference(spec: RoutingSpec, replica: int, step: int, layer: int, num_tokens: int):
    """Token by token, with sorting instead of argpartition and explicit loops."""
    x = np.random.default_rng([spec.seed, 0, replica, step, layer]).standard_normal(
        (num_tokens, GATE_DIM))
    w = router_weight(spec, layer)
    dispatch = np.zeros((spec.ep, spec.ep), dtype=np.int64)
    experts = np.zeros(spec.num_experts, dtype=np.int64)
    spr = spec.num_slots // spec.ep
    for t in range(num_tokens):
        score = gumbel_of(x[t] @ w) + np.log(spec.popularity)
        chosen = np.argsort(-score, kind="stable")[:spec.top_k]
        src = t * spec.ep // num_tokens
        for e in chosen:
            slots = np.flatnonzero(spec.slot_expert == e)
            dst = slots[t % slots.size] // spr
            dispatch[src, dst] += 1
            experts[e] += 1
    return dispatch, experts


@pytest.mark.parametrize("skew, redundant", [("uniform", 0), ("zipf", 0), ("zipf", 4)])
def test_route_matches_reference(skew, redundant):
    spec = RoutingSpec.make(num_experts=12, top_k=3, ep=4, skew=skew, zipf_s=1.1, seed=5,
                            num_redundant=redundant)
    r = route(spec, replica=1, step=9, layer=2, num_tokens=37)
    dispatch, experts = _reference(spec, 1, 9, 2, 37)
    assert r.dispatch.tolist() == dispatch.tolist()
    assert r.expert_tokens.tolist() == experts.tolist()
    assert r.dispatch.sum() == 37 * 3 == r.slot_tokens.sum()
    assert (np.sort(r.expert_ids, axis=1)[:, 1:] != np.sort(r.expert_ids, axis=1)[:, :-1]).all()


def test_route_is_deterministic_and_keyed():
    spec = RoutingSpec.make(num_experts=8, top_k=2, ep=2, seed=1)
    a = route(spec, replica=0, step=3, layer=1, num_tokens=50)
    assert np.array_equal(a.expert_ids, route(spec, replica=0, step=3, layer=1,
                                              num_tokens=50).expert_ids)
    for other in (dict(replica=1, step=3, layer=1), dict(replica=0, step=4, layer=1),
                  dict(replica=0, step=3, layer=2)):
        assert not np.array_equal(a.expert_ids, route(spec, num_tokens=50, **other).expert_ids)
    reseeded = RoutingSpec.make(num_experts=8, top_k=2, ep=2, seed=2)
    assert not np.array_equal(a.expert_ids, route(reseeded, replica=0, step=3, layer=1,
                                                  num_tokens=50).expert_ids)


def test_first_choice_follows_popularity():
    # Gumbel-top-k: a token's first expert is e with probability p[e] (up to the small
    # correlation between experts' logits through the shared router weight).
    spec = RoutingSpec.make(num_experts=8, top_k=1, ep=2, skew="zipf", zipf_s=1.2, seed=3)
    r = route(spec, replica=0, step=0, layer=1, num_tokens=100_000)
    assert np.abs(r.expert_tokens / 100_000 - spec.popularity).max() < 0.02
    assert np.isclose(spec.popularity.sum(), 1.0)
    assert spec.popularity.max() / spec.popularity.min() == pytest.approx(8 ** 1.2)


def test_popularity_vectors_and_errors():
    assert popularity_vector(4, "uniform").tolist() == [0.25] * 4
    assert popularity_vector(4, "zipf", zipf_s=0.0).tolist() == [0.25] * 4
    assert popularity_vector(4, "file", values=np.array([3, 1, 0, 0])).tolist() == [
        0.75, 0.25, 0.0, 0.0]
    with pytest.raises(ConfigError, match="one weight per expert"):
        popularity_vector(4, "file", values=np.ones(3))
    with pytest.raises(ConfigError, match=">= 0"):
        popularity_vector(4, "file", values=np.array([1, -1, 1, 1]))
    with pytest.raises(ConfigError, match="needs expert_popularity"):
        popularity_vector(4, "file")
    # A zero-popularity expert is never picked.
    spec = RoutingSpec.make(num_experts=4, top_k=2, ep=2, skew="file",
                            values=np.array([1.0, 1.0, 0.0, 1.0]))
    assert route(spec, replica=0, step=0, layer=0, num_tokens=200).expert_tokens[2] == 0


def test_eplb_places_copies_of_hot_experts_and_balances():
    p = np.array([0.5, 0.2, 0.1, 0.1, 0.05, 0.05])
    assert place_experts(p, 2).tolist() == [0, 1, 2, 3, 4, 5]
    slots = place_experts(p, 2, num_redundant=2)
    assert sorted(slots.tolist()) == [0, 0, 0, 1, 2, 3, 4, 5]  # 0.5 -> 3 copies of 0.167
    loads = p[slots] / np.bincount(slots)[slots]
    # Greedy packing, heaviest first: 0.2, 1/6, 1/6 | ... -> 31/60 and 29/60 (vs 0.8 and 0.2
    # contiguous).
    assert loads.reshape(2, 4).sum(axis=1).tolist() == pytest.approx([31 / 60, 29 / 60])
    with pytest.raises(ConfigError, match="split evenly"):
        place_experts(p, 4, num_redundant=1)

    def mean_imbalance(redundant: int) -> float:
        spec = RoutingSpec.make(num_experts=16, top_k=2, ep=4, skew="zipf", zipf_s=1.2,
                                seed=0, num_redundant=redundant)
        return float(np.mean([route(spec, replica=0, step=s, layer=1,
                                    num_tokens=512).imbalance for s in range(10)]))

    assert mean_imbalance(0) > 1.5 > 1.2 > mean_imbalance(8)


def test_layer_routing_figures():
    spec = RoutingSpec.make(num_experts=8, top_k=2, ep=4, seed=0)
    r = route(spec, replica=0, step=0, layer=1, num_tokens=3)  # ranks 0..2 hold one token
    assert r.dispatch.sum(axis=1).tolist() == [2, 2, 2, 0]
    off = r.dispatch - np.diag(np.diag(r.dispatch))
    assert r.busiest_a2a_rows == max(off.sum(axis=0).max(), off.sum(axis=1).max())
    assert r.imbalance == r.rank_tokens.max() / r.rank_tokens.mean()
    assert r.rank_active_slots(4).tolist() == (r.slot_tokens.reshape(4, 2) > 0).sum(1).tolist()
    empty = route(spec, replica=0, step=0, layer=1, num_tokens=0)
    assert empty.imbalance == 1.0 and empty.dispatch.sum() == 0
    # Samples only use the given source ranks.
    (s,) = sample_loads(spec, 20, 1, sources=np.array([0, 1]))
    assert s.dispatch[2:].sum() == 0 and s.dispatch.sum() == 40
