"""MoE routing (pure numpy): which experts each token of a step picks, and what that means
for the expert-parallel all-to-all.

One seeded definition serves the Ray workers (who feed its split sizes to
``all_to_all_single``), the driver's per-layer metrics, the tests and the simulator's
expected busiest-rank load, so all four agree exactly.

Gating, per (replica, step, layer) of a step with T tokens:

1. hidden states ``x [T, GATE_DIM] ~ N(0, 1)`` from ``default_rng([seed, 0, replica, step,
   layer])`` and a router weight ``w [GATE_DIM, E]`` with unit-norm columns from
   ``default_rng([seed, 1, layer])``; logits ``z = x @ w`` are then N(0, 1) per expert;
2. each logit is mapped to a standard Gumbel variable through its normal CDF
   (``g = -log(-log(Phi(z)))``), and the popularity enters as a bias: ``score = g +
   log(p)``; the top-k scores are the token's experts. For independent logits this is the
   Gumbel-top-k trick (Kool, van Hoof, Welling, ICML 2019): a token's first expert is e with
   probability exactly ``p[e]`` and the k picks are a draw without replacement, so the skew
   setting means what it says.

``GATE_DIM`` is narrower than a model's hidden size: with Gaussian states and unit-norm
router columns the width only changes the correlation between experts' logits (O(1 /
sqrt(width))), while a 7168-wide gate would cost ~4 GFLOP per layer on a host CPU.

Popularity ``p``: uniform, Zipf (``p ∝ 1 / rank^s`` over a seeded permutation of the experts,
so hot experts are not all on rank 0) or a vector given by the user.

Placement: ``S = E + R`` physical expert slots, ``S / ep`` per EP rank. Without redundancy
(R = 0) expert e sits on rank ``e // (E / ep)`` (as the memory plan and cost model assume).
With R > 0 (DeepSeek EPLB, github.com/deepseek-ai/EPLB): each extra replica goes to the
expert with the largest ``p / num_replicas``, then slots are packed heaviest first onto the
least loaded rank with room. A token's pair for a replicated expert goes to replica
``t mod num_replicas``.

Dispatch: the step's T tokens are split evenly and contiguously over the EP ranks that hold
them (token t on source ``t * n // T``); every (token, expert) pair is one row of
``hidden`` elements sent from the token's rank to the slot's rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from emulator.errors import ConfigError

GATE_DIM = 64
"""Width of the gating hidden states (see the module docstring)."""
SKEWS = ("uniform", "zipf", "file")

# Abramowitz & Stegun 7.1.26: erfc(x) ~ poly(t) exp(-x^2), t = 1 / (1 + P x), x >= 0,
# absolute error < 1.5e-7 (it only has to be one fixed monotone-enough map, see gumbel_of).
_AS_P = 0.3275911
_AS_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def popularity_vector(num_experts: int, skew: str, *, zipf_s: float = 1.0, seed: int = 0,
                      values: np.ndarray | None = None) -> np.ndarray:
    """float64 [E], summing to 1: the probability that a token's first expert is e."""
    if skew == "uniform":
        return np.full(num_experts, 1.0 / num_experts)
    if skew == "zipf":
        if zipf_s < 0:
            raise ConfigError(f"zipf_s={zipf_s} must be >= 0 (0 is uniform)")
        ranks = np.random.default_rng([seed, 2]).permutation(num_experts)
        p = 1.0 / (ranks + 1.0) ** zipf_s
        return p / p.sum()
    if skew == "file":
        if values is None:
            raise ConfigError("expert_skew='file' needs expert_popularity (a file of one "
                              "weight per routed expert)")
        v = np.asarray(values, dtype=np.float64).ravel()
        if v.size != num_experts:
            raise ConfigError(f"expert_popularity has {v.size} values; the model has "
                              f"{num_experts} routed experts, give one weight per expert")
        if not np.all(np.isfinite(v)) or (v < 0).any() or v.sum() <= 0:
            raise ConfigError("expert_popularity weights must be finite, >= 0 and not all 0")
        return v / v.sum()
    raise ConfigError(f"expert_skew={skew!r} is not one of {', '.join(SKEWS)}")


def place_experts(popularity: np.ndarray, ep: int, num_redundant: int = 0) -> np.ndarray:
    """int64 [E + R]: the logical expert of each physical slot; rank r holds slots
    ``r * S/ep .. (r+1) * S/ep - 1`` (see the module docstring)."""
    num_experts = popularity.size
    num_slots = num_experts + num_redundant
    if num_redundant < 0 or num_slots % ep:
        raise ConfigError(f"eplb_redundant_experts={num_redundant}: experts + redundant copies "
                          f"({num_slots}) must split evenly over ep={ep} ranks")
    if num_redundant == 0:
        return np.arange(num_experts, dtype=np.int64)
    replicas = np.ones(num_experts, dtype=np.int64)
    for _ in range(num_redundant):
        replicas[int(np.argmax(popularity / replicas))] += 1
    experts = np.repeat(np.arange(num_experts), replicas)
    loads = popularity[experts] / replicas[experts]
    per_rank = num_slots // ep
    rank_load = np.zeros(ep)
    rank_slots: list[list[int]] = [[] for _ in range(ep)]
    for i in np.argsort(-loads, kind="stable"):
        open_ranks = [r for r in range(ep) if len(rank_slots[r]) < per_rank]
        r = min(open_ranks, key=lambda q: (rank_load[q], q))
        rank_slots[r].append(int(experts[i]))
        rank_load[r] += loads[i]
    return np.array([e for slots in rank_slots for e in slots], dtype=np.int64)


@dataclass(frozen=True, eq=False)
class RoutingSpec:
    """Everything routing depends on besides (replica, step, layer, num_tokens)."""

    num_experts: int
    top_k: int
    ep: int
    popularity: np.ndarray
    """float64 [E], sums to 1."""
    slot_expert: np.ndarray
    """int64 [S]: logical expert of each physical slot, S / ep consecutive slots per rank."""
    seed: int = 0
    _log_p: np.ndarray = field(init=False, repr=False)
    _expert_slots: np.ndarray = field(init=False, repr=False)
    _num_replicas: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be in 1..{self.num_experts}")
        if self.slot_expert.size % self.ep:
            raise ValueError(f"{self.slot_expert.size} slots do not split over ep={self.ep}")
        reps = np.bincount(self.slot_expert, minlength=self.num_experts)
        if (reps == 0).any():
            raise ValueError("every expert needs at least one slot")
        slots = np.full((self.num_experts, int(reps.max())), -1, dtype=np.int64)
        fill = np.zeros(self.num_experts, dtype=np.int64)
        for s, e in enumerate(self.slot_expert.tolist()):
            slots[e, fill[e]] = s
            fill[e] += 1
        with np.errstate(divide="ignore"):
            object.__setattr__(self, "_log_p", np.log(self.popularity))
        object.__setattr__(self, "_expert_slots", slots)
        object.__setattr__(self, "_num_replicas", reps)

    @classmethod
    def make(cls, *, num_experts: int, top_k: int, ep: int, skew: str = "uniform",
             zipf_s: float = 1.0, values: np.ndarray | None = None, seed: int = 0,
             num_redundant: int = 0) -> RoutingSpec:
        p = popularity_vector(num_experts, skew, zipf_s=zipf_s, seed=seed, values=values)
        return cls(num_experts=num_experts, top_k=top_k, ep=ep, popularity=p,
                   slot_expert=place_experts(p, ep, num_redundant), seed=seed)

    @property
    def num_slots(self) -> int:
        return int(self.slot_expert.size)

    @property
    def slots_per_rank(self) -> int:
        return self.num_slots // self.ep


@dataclass(frozen=True, slots=True)
class LayerRouting:
    """The routing of one MoE layer in one step."""

    expert_ids: np.ndarray
    """int64 [T, k]: each token's experts, best score first."""
    expert_tokens: np.ndarray
    """int64 [E]: (token, expert) pairs per logical expert."""
    slot_tokens: np.ndarray
    """int64 [S]: pairs per physical slot (rank r holds slots r*S/ep ..)."""
    dispatch: np.ndarray
    """int64 [ep, ep]: pairs sent from EP rank i (the token's) to EP rank j (the slot's);
    the dispatch all-to-all's split sizes in rows, the combine's transposed."""

    @property
    def rank_tokens(self) -> np.ndarray:
        """int64 [ep]: pairs each rank's experts compute (dispatch rows received)."""
        return self.dispatch.sum(axis=0)

    @property
    def imbalance(self) -> float:
        """max / mean of rank_tokens (1.0 = balanced; 1.0 when no pairs)."""
        t = self.rank_tokens
        return float(t.max() / t.mean()) if t.sum() else 1.0

    def rank_active_slots(self, ep: int) -> np.ndarray:
        """int64 [ep]: slots with at least one pair, per rank (expert weights read)."""
        return (self.slot_tokens.reshape(ep, -1) > 0).sum(axis=1)

    @property
    def busiest_a2a_rows(self) -> int:
        """Max over ranks of rows sent to, or received from, other ranks."""
        off = self.dispatch - np.diag(np.diag(self.dispatch))
        return int(max(off.sum(axis=1).max(initial=0), off.sum(axis=0).max(initial=0)))


def router_weight(spec: RoutingSpec, layer: int) -> np.ndarray:
    """float64 [GATE_DIM, E] with unit-norm columns, the same on every rank."""
    w = np.random.default_rng([spec.seed, 1, layer]).standard_normal((GATE_DIM, spec.num_experts))
    return w / np.linalg.norm(w, axis=0, keepdims=True)


def gumbel_of(z: np.ndarray) -> np.ndarray:
    """Standard Gumbel variables from standard normal ones: -log(-log(Phi(z))), with the
    upper tail computed directly so that large z keeps its precision."""
    a = np.abs(z) * (1.0 / np.sqrt(2.0))
    t = 1.0 / (1.0 + _AS_P * a)
    poly = t * (_AS_A[0] + t * (_AS_A[1] + t * (_AS_A[2] + t * (_AS_A[3] + t * _AS_A[4]))))
    tail = 0.5 * poly * np.exp(-a * a)  # P(N > |z|)
    with np.errstate(divide="ignore"):
        neg_log_cdf = np.where(z >= 0, -np.log1p(-tail), -np.log(tail))
        return -np.log(neg_log_cdf)


def _gate(spec: RoutingSpec, hidden_key: list[int], layer: int, num_tokens: int) -> np.ndarray:
    """int64 [T, k]: each token's experts, best score first."""
    k = spec.top_k
    x = np.random.default_rng(hidden_key).standard_normal((num_tokens, GATE_DIM))
    scores = gumbel_of(x @ router_weight(spec, layer)) + spec._log_p  # [T, E]
    if k < spec.num_experts:
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    else:
        top = np.broadcast_to(np.arange(k), (num_tokens, k)).copy()
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1)


def _layer_routing(spec: RoutingSpec, ids: np.ndarray, sources: np.ndarray) -> LayerRouting:
    num_tokens, ep = ids.shape[0], spec.ep
    token = np.arange(num_tokens)[:, None]
    slot = spec._expert_slots[ids, token % spec._num_replicas[ids]]  # [T, k]
    src = sources[(np.arange(num_tokens) * sources.size) // max(num_tokens, 1)][:, None]
    dst = slot // spec.slots_per_rank
    dispatch = np.bincount((src * ep + dst).ravel(), minlength=ep * ep).reshape(ep, ep)
    return LayerRouting(
        expert_ids=ids, expert_tokens=np.bincount(ids.ravel(), minlength=spec.num_experts),
        slot_tokens=np.bincount(slot.ravel(), minlength=spec.num_slots), dispatch=dispatch)


def route(spec: RoutingSpec, *, replica: int, step: int, layer: int,
          num_tokens: int) -> LayerRouting:
    """The routing of ``num_tokens`` tokens of (replica, step) at MoE layer ``layer``, the
    tokens split evenly over all ``ep`` ranks."""
    if num_tokens < 0 or min(replica, step, layer) < 0:
        raise ValueError("replica, step, layer and num_tokens must be >= 0")
    ids = _gate(spec, [spec.seed, 0, replica, step, layer], layer, num_tokens)
    return _layer_routing(spec, ids, np.arange(spec.ep))


def sample_loads(spec: RoutingSpec, num_tokens: int, num_samples: int,
                 sources: np.ndarray | None = None) -> list[LayerRouting]:
    """``num_samples`` independent routings of ``num_tokens`` tokens: the simulator's sample
    of the load distribution. One gate call over ``num_samples * num_tokens`` tokens (hidden
    states from a stream of their own, layer 0's router), cut into samples.
    ``sources``: EP ranks that hold the tokens (default all)."""
    src = np.arange(spec.ep) if sources is None else np.asarray(sources, dtype=np.int64)
    ids = _gate(spec, [spec.seed, 3, num_tokens, num_samples], 0, num_samples * num_tokens)
    return [_layer_routing(spec, ids[i * num_tokens:(i + 1) * num_tokens], src)
            for i in range(num_samples)]
