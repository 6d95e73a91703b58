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
"""

from __future__ import annotations

import numpy as np

from emulator.core.plan import BatchPlan
from emulator.core.work import StageWork, StepWork
from emulator.cost.comm import CommProfile, placement_of
from emulator.cost.compute import (Efficiency, RankShapes, Roofline, attention_time_s,
                                   dense_mlp_time_s, embed_time_s, lm_head_time_s, moe_time_s)


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
                 efficiency: Efficiency | None = None) -> None:
        layout.validate_for(model)
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

    # --- communication lines, resolved once per replica -------------------------------
    def _lines(self, replica: int) -> dict:
        lines = self._comm.get(replica)
        if lines is not None:
            return lines
        lay, gpn, prof = self.layout, self.hardware.gpus_per_node, self.profile
        tp_groups = [[lay.rank_of(replica, p, t) for t in range(self.tp)] for p in range(self.pp)]
        tp_place = [placement_of(g, gpn) for g in tp_groups]

        def line(op, n, places):
            if n <= 1:
                return [0.0] * self.pp, [0.0] * self.pp
            entries = [prof.lookup(op, n, pl) for pl in places]
            return ([e.alpha_s for e in entries],
                    [e.beta_s_per_byte + e.gamma_s_per_byte for e in entries])

        ar = line("all_reduce", self.tp, tp_place)
        ag = line("all_gather", self.tp, tp_place)
        a2a = ([0.0] * self.pp, [0.0] * self.pp)
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
        return self._work(num_tokens, prefill_pairs, decode_pairs, prefill_ctx,
                          int(ctx.sum()) + num_tokens, num_samples, expert_tokens)

    def _work(self, num_tokens, prefill_pairs, decode_pairs, prefill_ctx, kv_tokens,
              num_samples, expert_tokens=None) -> StepWork:
        s, roof = self.shapes, self.roofline
        attn = float(attention_time_s(s, roof, num_tokens, prefill_pairs, decode_pairs,
                                      prefill_ctx, kv_tokens))
        dense = float(dense_mlp_time_s(s, roof, num_tokens)) if self.model.intermediate_size else 0.0
        moe = self._moe_times(num_tokens, expert_tokens)
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
            last = p == self.pp - 1
            stages.append(StageWork(
                stage=p, layer_ids=ids, attn_compute_s=np.full(ids.size, attn),
                mlp_compute_s=mlp, tp_allreduce_bytes=tp_bytes,
                pre_compute_s=float(embed_time_s(s, roof, num_tokens)) if p == 0 else 0.0,
                embed_allreduce_bytes=tp_bytes if p == 0 else 0,
                post_compute_s=float(lm_head_time_s(s, roof, num_samples)) if last else 0.0,
                logits_gather_bytes=(num_samples * (self.model.vocab_size // self.tp)
                                     * self.model.dtype_bytes if last and self.tp > 1 else 0),
                pp_send_bytes=0 if last else act))
        return StepWork(stages=stages, num_tokens=num_tokens, num_sampled_tokens=num_samples)

    def _moe_times(self, num_tokens: int, expert_tokens):
        """One float for uniform routing, else float [num_layers] per layer."""
        if not self.model.is_moe:
            return 0.0
        s, roof, group = self.shapes, self.roofline, num_tokens * self._group_batches
        if expert_tokens is None:
            return float(moe_time_s(s, roof, num_tokens, group, self.ep))
        counts = np.asarray(expert_tokens)
        if counts.ndim == 1:
            return float(moe_time_s(s, roof, num_tokens, group, self.ep, counts))
        if counts.shape != (self.model.num_layers, self.model.num_routed_experts):
            raise ValueError(f"expert_tokens must be [num_routed_experts] or [num_layers, "
                             f"num_routed_experts], got shape {counts.shape}")
        out = np.zeros(self.model.num_layers)
        for layer in range(self.model.num_dense_layers, self.model.num_layers):
            out[layer] = moe_time_s(s, roof, num_tokens, group, self.ep, counts[layer])
        return out

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
        all-gather and (MoE, ep > 1) a dispatch and a combine all-to-all per MoE layer.
        p2p_s: one stage-to-stage activation transfer (the slowest boundary); 0 when pp == 1.
        """
        lines = self._lines(replica)
        ar_a, ar_b = lines["ar"]
        ag_a, ag_b = lines["ag"]
        a2a_a, a2a_b = lines["a2a"]
        a2a_bytes = self.ep_all_to_all_bytes(work.num_tokens)
        compute = np.empty(self.pp)
        comm = np.empty(self.pp)
        # Python scalars per stage: cheaper than array arithmetic for a handful of stages.
        for p, st in enumerate(work.stages):
            compute[p] = st.compute_s
            t = 0.0
            if st.tp_allreduce_bytes:
                t += 2 * st.layer_ids.size * (ar_a[p] + ar_b[p] * st.tp_allreduce_bytes)
            if st.embed_allreduce_bytes:
                t += ar_a[p] + ar_b[p] * st.embed_allreduce_bytes
            if st.logits_gather_bytes:  # all_gather is priced by its gathered output
                t += ag_a[p] + ag_b[p] * st.logits_gather_bytes * self.tp
            if a2a_bytes:  # dispatch + combine per MoE layer
                t += 2 * self._num_moe[p] * (a2a_a[p] + a2a_b[p] * a2a_bytes)
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
        # Everything else depends on R only: price one step with the same sizes, then swap in
        # the attention term that varies.
        work = self._work(num_req, 0, 0, 0, 0, num_req)
        base_compute, comm, p2p = self.stage_times(work, replica)
        attn0 = float(attention_time_s(s, roof, num_req, 0, 0, 0, 0))
        compute = base_compute[None, :] + np.outer(attn - attn0, self._num_layers)
        return compute, np.broadcast_to(comm, compute.shape).copy(), p2p

    def decode_run_times(self, context_tokens: np.ndarray, num_steps: int,
                         replica: int = 0) -> np.ndarray:
        """float [num_steps]: :func:`plan_latency_s` of each step of a steady decode run
        (see :meth:`decode_run_stage_times`)."""
        compute, comm, p2p = self.decode_run_stage_times(context_tokens, num_steps, replica)
        return compute.sum(axis=1) + comm.sum(axis=1) + (self.pp - 1) * p2p
