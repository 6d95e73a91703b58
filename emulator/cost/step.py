"""Step cost: a BatchPlan -> per-stage work (StepWork) -> per-stage times.

The simulator calls :meth:`CostModel.step_work` and :meth:`CostModel.stage_times` once per
plan (~1e5 times per run), so everything that does not depend on the plan (per-rank shapes,
stage layer ranges, the collective lines of each group) is resolved in the constructor, and
a step costs a handful of numpy reductions over the requests: identical layers are priced
once and broadcast.

Composition of one plan (the simulator's and the Ray workers' shared reading of StageWork):
stage p computes ``pre + sum(attn + mlp) + post`` and communicates ``2 * L_p`` TP
all-reduces, the embedding all-reduce (stage 0), the logits all-gather (last stage) and, for
MoE layers with ep > 1, an all-to-all dispatch and combine; then it sends the activations to
stage p + 1. :func:`plan_latency_s` adds these up for one plan going through all stages.

Expert parallelism (ep > 1). Given a :class:`~emulator.core.routing.RoutingSpec`, routed
experts and all-to-alls are priced on the *busiest* rank of the routing's load distribution:
the expectation over seeded sample routings (core.routing.sample_loads, the same gating the
workers run) of max over ranks of the rank's grouped-GEMM time, and of max over ranks of
the rows it sends to or receives from other ranks. Samples are drawn once per token count
(exact up to 64 group tokens, then 4 buckets per octave up to 4096, scaled linearly to
the exact count) and cached. Without a RoutingSpec the uniform expectation of compute.moe_time_s is
used. StageWork also carries what a worker needs to scale its own expert delay by the pairs
it really receives (``expert_s_per_pair``, ``expert_s_per_weight``).
"""

from __future__ import annotations

import numpy as np

import math
from dataclasses import dataclass

from emulator.core.plan import BatchPlan
from emulator.core.routing import RoutingSpec, sample_loads
from emulator.core.work import StageWork, StepWork
from emulator.cost.comm import CommProfile, placement_of
from emulator.cost.compute import (Efficiency, RankShapes, Roofline, attention_time_s,
                                   dense_mlp_time_s, embed_time_s, lm_head_time_s,
                                   moe_fixed_time_s, moe_time_s, routed_time_s)

EXACT_LOAD_TOKENS = 64
"""Group token counts up to this are sampled exactly; larger ones in quarter-octave buckets."""
MAX_SAMPLE_TOKENS = 4096
"""Larger buckets are sampled at this many tokens and scaled: beyond it the sampling noise
of the per-rank load is small against the popularity skew, and one 64k-token sample of a
256-expert gate costs seconds."""


@dataclass(frozen=True, slots=True)
class MoeLoad:
    """Predicted per-layer expert load of one step (expectations over sample routings)."""

    num_group_tokens: int
    """Tokens entering the EP group."""
    busiest_expert_s: float
    """Routed-expert time of the most loaded rank, target seconds."""
    mean_expert_s: float
    """Routed-expert time averaged over ranks; busiest - mean is the predicted mean
    sync-wait of a rank in the combine all-to-all."""
    imbalance: float
    """max / mean of the (token, expert) pairs per rank."""
    busiest_a2a_rows: float
    """Max over ranks of rows sent to or received from other ranks, per all-to-all."""


def _load_bucket(num_tokens: int) -> int:
    if num_tokens <= EXACT_LOAD_TOKENS:
        return num_tokens
    return min(MAX_SAMPLE_TOKENS, int(round(2.0 ** (round(4 * math.log2(num_tokens)) / 4))))


def plan_latency_s(compute_s: np.ndarray, comm_s: np.ndarray, p2p_s: float) -> float:
    """Time from stage 0 starting a plan to the last stage finishing it, with no waiting:
    every stage's compute and communication plus one transfer per stage boundary."""
    return float(compute_s.sum() + comm_s.sum() + (len(compute_s) - 1) * p2p_s)


class CostModel:
    """Prices plans of one DP replica layout on a target hardware.

    ``profile`` defaults to :meth:`CommProfile.from_hardware`; ``efficiency`` overrides the
    hardware's mfu / mbu / launch overhead.
    """

    def __init__(self, model, hardware, layout, profile: CommProfile | None = None,
                 efficiency: Efficiency | None = None, *, routing: RoutingSpec | None = None,
                 dispatch_dtype_bytes: int | None = None, thermometer: bool = False) -> None:
        layout.validate_for(model)
        self._args = dict(efficiency=efficiency, routing=routing,
                          dispatch_dtype_bytes=dispatch_dtype_bytes, thermometer=thermometer)
        self.thermometer = bool(thermometer)
        """Thermometer probe in every stage with tp > 1 (StageWork.probe_bytes: the stage's
        own all-reduce size)."""
        self.model, self.hardware, self.layout = model, hardware, layout
        self.tp, self.pp, self.ep = layout.tp, layout.pp, layout.ep
        self.profile = profile or CommProfile.from_hardware(
            hardware, max_group_size=max(2, layout.dp * layout.tp * layout.pp))
        self.roofline = Roofline.of(hardware, efficiency)
        self.shapes = RankShapes.of(model, self.tp, self.ep)
        self._mla = model.attention == "mla"
        self._act_bytes = model.hidden_size * model.dtype_bytes  # one activation row
        # With attention data parallelism the EP group gathers the batches of ep // tp
        # replicas; we assume they are as large as this one.
        attention_dp = bool(getattr(layout, "attention_dp", False))
        self._group_batches = max(1, self.ep // self.tp) if attention_dp else 1
        self._stage_layers = []
        for first, last in layout.stage_layers(model):
            ids = np.arange(first, last, dtype=np.int64)
            moe = (ids >= model.num_dense_layers) if model.is_moe else np.zeros(ids.size, bool)
            self._stage_layers.append((ids, moe, int(moe.sum())))
        self._num_moe = [m for _, _, m in self._stage_layers]
        self._num_layers = np.array([ids.size for ids, _, _ in self._stage_layers], np.float64)
        self._comm = {}  # replica -> resolved collective lines
        # (requests, replica) -> a pure-decode step's stage times without its attention term
        # and that term at context 0 (decode_run_stage_times)
        self._decode_base: dict[tuple[int, int], tuple] = {}
        # --- expert parallelism ---
        self._ep_on = model.is_moe and self.ep > 1
        if routing is not None and (routing.num_experts != model.num_routed_experts
                                    or routing.top_k != model.num_experts_per_tok
                                    or routing.ep != self.ep):
            raise ValueError(f"routing is for {routing.num_experts} experts top-"
                             f"{routing.top_k} ep={routing.ep}; the model/layout has "
                             f"{model.num_routed_experts} top-{model.num_experts_per_tok} "
                             f"ep={self.ep}")
        self.routing = routing if self._ep_on else None
        dispatch_b = model.dtype_bytes if dispatch_dtype_bytes is None else dispatch_dtype_bytes
        self._dispatch_row = model.hidden_size * dispatch_b if self._ep_on else 0
        self._combine_row = model.hidden_size * model.dtype_bytes if self._ep_on else 0
        # Ranks of the EP group that hold a stage's tokens: its TP ranks when EP spans
        # stages (group order is stage-major), every rank otherwise.
        self._ep_sources = (np.arange(self.tp) if getattr(layout, "ep_spans_stages", False)
                            else None)
        self._loads: dict[int, tuple] = {}  # token bucket -> sampled per-rank loads
        self._load_by_tokens: dict[int, MoeLoad] = {}

    def with_profile(self, profile: CommProfile) -> "CostModel":
        """The same cost model (routing, dispatch dtype, probes) pricing with ``profile``."""
        return CostModel(self.model, self.hardware, self.layout, profile, **self._args)

    # --- communication lines, resolved once per replica -------------------------------
    def _lines(self, replica: int) -> dict:
        lines = self._comm.get(replica)
        if lines is not None:
            return lines
        lay, gpn, prof = self.layout, self.hardware.gpus_per_node, self.profile
        tp_groups = [[lay.rank_of(replica, p, t) for t in range(self.tp)] for p in range(self.pp)]
        tp_place = [placement_of(g, gpn) for g in tp_groups]

        def line(op, n, places):
            """Per stage the entry pricing ``op`` (None: no such collective)."""
            if n <= 1:
                return [None] * self.pp
            return [prof.lookup(op, n, pl) for pl in places]

        ar = line("all_reduce", self.tp, tp_place)
        ag = line("all_gather", self.tp, tp_place)
        a2a = [None] * self.pp
        if self.ep > 1:
            ep_groups = {r: g for g in lay.groups("ep") for r in g}
            a2a = line("all_to_all", self.ep, [placement_of(ep_groups[g[0]], gpn)
                                               for g in tp_groups])
        hops = []
        for p in range(self.pp - 1):
            pairs = [(lay.rank_of(replica, p, t), lay.rank_of(replica, p + 1, t))
                     for t in range(self.tp)]
            place = "inter" if any(placement_of(pr, gpn) == "inter" for pr in pairs) else "intra"
            hops.append(prof.lookup("send_recv", 2, place))
        lines = {"ar": ar, "ag": ag, "a2a": a2a, "hops": hops}
        self._comm[replica] = lines
        return lines

    # --- plan -> work ------------------------------------------------------------------
    def step_work(self, plan: BatchPlan, *, prompt_tokens: np.ndarray | None = None,
                  expert_tokens: np.ndarray | None = None) -> StepWork:
        """Per-stage work of ``plan``.

        prompt_tokens: optional int [R], per request the number of tokens it must hold in
        its KV cache before it samples (its prompt length; prompt + already generated tokens
        when recomputing after a preemption). A prefill request samples this step when
        ``num_context_tokens + num_new_tokens >= prompt_tokens``; decodes always sample.
        Without it every prefill request is assumed to finish its prompt this step (exact
        without chunked prefill; otherwise it over-counts LM-head work a little).

        expert_tokens: optional real routing counts, int [num_routed_experts] (every MoE
        layer) or [num_layers, num_routed_experts] (rows of dense layers are ignored): the
        (token, expert) pairs of the EP group per expert; default uniform routing.
        """
        new, ctx, pf = plan.num_new_tokens, plan.num_context_tokens, plan.is_prefill
        num_tokens = int(new.sum())
        # Causal (query, key) pairs per request: new * ctx + new * (new + 1) / 2.
        pairs = int(new @ ctx) + (int(new @ new) + num_tokens) // 2
        if self._mla and pf.any():
            new_p, ctx_p = new[pf], ctx[pf]
            prefill_pairs = int(new_p @ ctx_p) + (int(new_p @ new_p) + int(new_p.sum())) // 2
            prefill_ctx = int(ctx_p.sum())
        else:
            prefill_pairs, prefill_ctx = 0, 0
        # Non-MLA models cost the same per pair in prefill and decode: use one bucket.
        decode_pairs = pairs - prefill_pairs
        num_samples = len(new)
        if prompt_tokens is not None:
            num_samples -= int(np.count_nonzero(pf & (ctx + new < prompt_tokens)))
        work = self._work(num_tokens, prefill_pairs, decode_pairs, prefill_ctx,
                          int(ctx.sum()) + num_tokens, num_samples, expert_tokens)
        if self._ep_on:
            for st in work.stages:
                st.routing_replica, st.routing_step = plan.replica, plan.step
        return work

    def _work(self, num_tokens, prefill_pairs, decode_pairs, prefill_ctx, kv_tokens,
              num_samples, expert_tokens=None) -> StepWork:
        s, roof = self.shapes, self.roofline
        attn = float(attention_time_s(s, roof, num_tokens, prefill_pairs, decode_pairs,
                                      prefill_ctx, kv_tokens))
        dense = float(dense_mlp_time_s(s, roof, num_tokens)) if self.model.intermediate_size else 0.0
        ep = self._ep_fields(num_tokens, expert_tokens)
        moe = ep.pop("moe")
        expert = ep.pop("expert")
        act = num_tokens * self._act_bytes
        tp_bytes = act if self.tp > 1 else 0
        stages = []
        for p, (ids, is_moe, num_moe) in enumerate(self._stage_layers):
            if num_moe == 0:
                mlp = np.full(ids.size, dense)
            elif isinstance(moe, float):
                mlp = np.where(is_moe, moe, dense)
            else:
                mlp = np.where(is_moe, moe[ids], dense)
            if self._ep_on and num_moe:
                ep_fields = dict(ep, ep_layers=is_moe, expert_compute_s=np.where(
                    is_moe, expert if isinstance(expert, float) else expert[ids], 0.0))
            else:
                ep_fields = {}
            last = p == self.pp - 1
            stages.append(StageWork(
                stage=p, layer_ids=ids, attn_compute_s=np.full(ids.size, attn),
                mlp_compute_s=mlp, tp_allreduce_bytes=tp_bytes,
                pre_compute_s=float(embed_time_s(s, roof, num_tokens)) if p == 0 else 0.0,
                embed_allreduce_bytes=tp_bytes if p == 0 else 0,
                post_compute_s=float(lm_head_time_s(s, roof, num_samples)) if last else 0.0,
                logits_gather_bytes=(num_samples * (self.model.vocab_size // self.tp)
                                     * self.model.dtype_bytes if last and self.tp > 1 else 0),
                pp_send_bytes=0 if last else act,
                probe_bytes=tp_bytes if self.thermometer and self.tp > 1 else 0,
                **ep_fields))
        return StepWork(stages=stages, num_tokens=num_tokens, num_sampled_tokens=num_samples)

    def _moe_times(self, num_tokens: int, expert_tokens):
        """(mlp, routed): the MoE MLP time of the busiest rank and its routed-expert part;
        floats for one value for every MoE layer, else float [num_layers] per layer."""
        if not self.model.is_moe:
            return 0.0, 0.0
        s, roof, group = self.shapes, self.roofline, num_tokens * self._group_batches
        fixed = moe_fixed_time_s(s, roof, num_tokens) + roof.launch_s
        if expert_tokens is None:
            if self.routing is not None:
                routed = self.moe_load(num_tokens).busiest_expert_s
                return fixed + routed, routed
            mlp = float(moe_time_s(s, roof, num_tokens, group, self.ep))
            return mlp, mlp - fixed
        counts = np.asarray(expert_tokens)
        if counts.ndim == 1:
            mlp = float(moe_time_s(s, roof, num_tokens, group, self.ep, counts))
            return mlp, mlp - fixed
        if counts.shape != (self.model.num_layers, self.model.num_routed_experts):
            raise ValueError(f"expert_tokens must be [num_routed_experts] or [num_layers, "
                             f"num_routed_experts], got shape {counts.shape}")
        out = np.zeros(self.model.num_layers)
        for layer in range(self.model.num_dense_layers, self.model.num_layers):
            out[layer] = moe_time_s(s, roof, num_tokens, group, self.ep, counts[layer])
        return out, np.where(out > 0, out - fixed, 0.0)

    def _ep_fields(self, num_tokens: int, expert_tokens) -> dict:
        """moe / expert times plus the StageWork EP fields shared by all stages."""
        moe, expert = self._moe_times(num_tokens, expert_tokens)
        fields = {"moe": moe, "expert": expert}
        if not self._ep_on:
            return fields
        if self.routing is not None and expert_tokens is None:
            rows = self.moe_load(num_tokens).busiest_a2a_rows
        else:  # uniform expectation (cost convention of ep_all_to_all_bytes)
            rows = self.ep_all_to_all_bytes(num_tokens) / self._act_bytes
        s, roof = self.shapes, self.roofline
        fields.update(
            expert_s_per_pair=s.expert_flops_per_pair / roof.flops_per_s,
            expert_s_per_weight=s.expert_weight_bytes / roof.bytes_per_s,
            dispatch_bytes_per_row=self._dispatch_row, combine_bytes_per_row=self._combine_row,
            ep_dispatch_bytes=int(rows * self._dispatch_row),
            ep_combine_bytes=int(rows * self._combine_row), routing=self.routing)
        return fields

    def moe_load(self, num_tokens: int) -> MoeLoad:
        """Predicted load of one MoE layer for a step of ``num_tokens`` tokens on this
        replica (needs a RoutingSpec); cached per token bucket."""
        if self.routing is None:
            raise ValueError("moe_load needs a CostModel built with routing= (MoE, ep > 1)")
        group = num_tokens * self._group_batches
        done = self._load_by_tokens.get(group)
        if done is not None:
            return done
        bucket = _load_bucket(group)
        base = self._loads.get(bucket)
        if base is None:
            base = self._sample_load(bucket)
            self._loads[bucket] = base
        scale = group / bucket if bucket else 0.0
        pairs, active, imbalance, rows = base
        s, roof = self.shapes, self.roofline
        times = [routed_time_s(s, roof, p * scale, a) for p, a in zip(pairs, active)]
        busiest = float(np.mean([t.max() for t in times]))
        mean = float(np.mean([t.mean() for t in times]))
        load = MoeLoad(num_group_tokens=group, busiest_expert_s=busiest, mean_expert_s=mean,
                       imbalance=imbalance, busiest_a2a_rows=rows * scale)
        self._load_by_tokens[group] = load
        return load

    def _sample_load(self, num_tokens: int) -> tuple:
        # Enough samples to see ~4k pairs, at least 4 and at most 32.
        pairs_seen = max(1, num_tokens * self.routing.top_k)
        n = int(min(32, max(4, math.ceil(4096 / pairs_seen))))
        samples = sample_loads(self.routing, num_tokens, n, self._ep_sources)
        pairs = [r.rank_tokens.astype(np.float64) for r in samples]
        active = [r.rank_active_slots(self.ep).astype(np.float64) for r in samples]
        imbalance = float(np.mean([r.imbalance for r in samples]))
        rows = float(np.mean([r.busiest_a2a_rows for r in samples]))
        return pairs, active, imbalance, rows

    def ep_all_to_all_bytes(self, num_tokens: int) -> int:
        """Busiest-rank bytes of one EP all-to-all (dispatch or combine) for uniform routing:
        the group's tokens are split evenly over the ep ranks, each token goes to top_k
        experts, and (ep - 1) / ep of those copies leave the rank."""
        if self.ep <= 1 or not self.model.is_moe:
            return 0
        group = num_tokens * self._group_batches
        copies = group / self.ep * self.model.num_experts_per_tok * (self.ep - 1) / self.ep
        return int(copies * self._act_bytes)

    # --- work -> times -------------------------------------------------------------------
    def stage_times(self, work: StepWork, replica: int = 0) -> tuple[np.ndarray, np.ndarray, float]:
        """(compute_s [pp], comm_s [pp], p2p_s) of ``work`` run by DP replica ``replica``.

        comm_s per stage: 2 TP all-reduces per layer, the embedding all-reduce, the logits
        all-gather, (MoE, ep > 1) a dispatch and a combine all-to-all per MoE layer, and the
        thermometer probe's all-reduce (``probe_bytes``). p2p_s: one stage-to-stage
        activation transfer (the slowest boundary); 0 when pp == 1.
        """
        lines = self._lines(replica)
        ar, ag, a2a = lines["ar"], lines["ag"], lines["a2a"]
        compute = np.empty(self.pp)
        comm = np.empty(self.pp)
        # Python scalars per stage: cheaper than array arithmetic for a handful of stages.
        for p, st in enumerate(work.stages):
            compute[p] = st.compute_s
            t = 0.0
            if ar[p] is not None:
                if st.tp_allreduce_bytes:
                    t += 2 * st.layer_ids.size * ar[p].time_s(st.tp_allreduce_bytes)
                if st.embed_allreduce_bytes:
                    t += ar[p].time_s(st.embed_allreduce_bytes)
            if ag[p] is not None and st.logits_gather_bytes:
                t += ag[p].time_s(st.logits_gather_bytes * self.tp)  # by gathered output
            if a2a[p] is not None and st.ep_dispatch_bytes:  # dispatch + combine per MoE layer
                t += self._num_moe[p] * (a2a[p].time_s(st.ep_dispatch_bytes)
                                         + a2a[p].time_s(st.ep_combine_bytes))
            if ar[p] is not None and st.probe_bytes:
                t += ar[p].time_s(st.probe_bytes)
            comm[p] = t
        send = work.stages[0].pp_send_bytes if self.pp > 1 else 0
        p2p = max((h.time_s(send) for h in lines["hops"]), default=0.0)
        return compute, comm, float(p2p)

    # --- steady decode fast-forward ---------------------------------------------------------
    def decode_run_stage_times(self, context_tokens: np.ndarray, num_steps: int,
                               replica: int = 0) -> tuple[np.ndarray, np.ndarray, float]:
        """Stage times of ``num_steps`` consecutive pure-decode steps of the same R requests,
        whose contexts start at ``context_tokens`` [R] and grow by one per step: (compute_s
        [num_steps, pp], comm_s [num_steps, pp], p2p_s). Equal to step_work + stage_times
        per step (uniform routing), without a Python loop over steps."""
        ctx = np.asarray(context_tokens, dtype=np.int64)
        num_req = ctx.size
        steps = np.arange(num_steps, dtype=np.float64)
        # Step i: every request attends to (ctx + i + 1) keys and reads as many KV rows.
        kv = float(ctx.sum()) + num_req * (steps + 1.0)
        s, roof = self.shapes, self.roofline
        attn = attention_time_s(s, roof, num_req, 0.0, kv, 0.0, kv)  # [S]
        # Everything else depends on R only: price one step with the same sizes (once per R
        # and replica), then swap in the attention term that varies.
        base = self._decode_base.get((num_req, replica))
        if base is None:
            work = self._work(num_req, 0, 0, 0, 0, num_req)
            base = (*self.stage_times(work, replica),
                    float(attention_time_s(s, roof, num_req, 0, 0, 0, 0)))
            self._decode_base[(num_req, replica)] = base
        base_compute, comm, p2p, attn0 = base
        compute = base_compute[None, :] + (attn - attn0)[:, None] * self._num_layers
        comm_run = np.empty_like(compute)
        comm_run[:] = comm
        return compute, comm_run, p2p

    def decode_run_times(self, context_tokens: np.ndarray, num_steps: int,
                         replica: int = 0) -> np.ndarray:
        """float [num_steps]: :func:`plan_latency_s` of each step of a steady decode run
        (see :meth:`decode_run_stage_times`)."""
        compute, comm, p2p = self.decode_run_stage_times(context_tokens, num_steps, replica)
        return compute.sum(axis=1) + comm.sum(axis=1) + (self.pp - 1) * p2p
