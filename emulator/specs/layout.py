"""The parallel layout: degrees of each mesh axis and the rank arithmetic.

Ranks form a mesh ``(dp, pp, tp)`` with TP innermost, so TP peers are consecutive ranks and
sit on one node: ``rank = (d * pp + p) * tp + t``. Expert parallelism (EP) re-uses the ranks
of the other axes; the supported groupings are

- ``ep == 1``: no EP; each expert is split across the TP ranks of its stage, like a dense MLP.
- ``ep == tp``: the TP ranks of a stage hold ``num_routed_experts / ep`` whole experts each.
- ``ep == tp * pp`` (pp > 1): all ranks of a replica form one EP group, and every rank holds
  ``num_routed_experts / ep`` experts of *every* MoE layer, so a layer's tokens are dispatched
  to ranks of all stages.
- ``attention_dp=True`` with ``ep == dp * tp``: attention is data-parallel (each DP replica
  keeps its own KV cache) while the MoE layers of a stage form one EP group across replicas.

"axis" names a mesh axis (dp, pp, tp, ep); a "group" is the list of ranks that communicate
along it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from emulator.errors import LayoutError
from emulator.specs.model import ModelSpec

Axis = Literal["dp", "pp", "tp", "ep"]


class ParallelLayout(BaseModel):
    """Degrees of data, tensor, pipeline and expert parallelism."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dp: int = Field(1, ge=1, description="Data-parallel replicas, each with its own KV cache.")
    tp: int = Field(1, ge=1, description="Tensor-parallel ranks per pipeline stage.")
    pp: int = Field(1, ge=1, description="Pipeline stages per replica.")
    ep: int = Field(1, ge=1, description="Expert-parallel ranks per MoE layer: 1, tp, tp*pp, "
                    "or dp*tp with attention_dp.")
    attention_dp: bool = Field(
        False, description="Data-parallel attention with EP across replicas (needs "
        "ep == dp*tp).")

    @model_validator(mode="after")
    def _check_ep(self) -> ParallelLayout:
        dp, tp, pp, ep = self.dp, self.tp, self.pp, self.ep
        if self.attention_dp:
            if ep != dp * tp or ep == 1:
                raise ValueError(f"attention_dp=True needs ep == dp*tp = {dp * tp} > 1, got "
                                 f"ep={ep}; set ep={dp * tp} or attention_dp=False")
        elif ep not in (1, tp, tp * pp):
            raise ValueError(f"ep={ep} is not supported with dp={dp}, tp={tp}, pp={pp}; use "
                             f"ep=1, ep=tp ({tp}), ep=tp*pp ({tp * pp}), or attention_dp=True "
                             f"with ep=dp*tp ({dp * tp})")
        return self

    @property
    def world_size(self) -> int:
        return self.dp * self.pp * self.tp

    @property
    def ep_spans_stages(self) -> bool:
        """EP groups hold ranks of several pipeline stages (``ep == tp*pp``, pp > 1)."""
        return not self.attention_dp and self.pp > 1 and self.ep == self.tp * self.pp > self.tp

    # --- rank arithmetic -------------------------------------------------------------
    def rank_of(self, dp: int, pp: int, tp: int) -> int:
        """Global rank of mesh coordinates (dp, pp, tp)."""
        for axis, coord, size in (("dp", dp, self.dp), ("pp", pp, self.pp), ("tp", tp, self.tp)):
            if not 0 <= coord < size:
                raise ValueError(f"{axis} coordinate {coord} out of range 0..{size - 1}")
        return (dp * self.pp + pp) * self.tp + tp

    def rank_coords(self, rank: int) -> tuple[int, int, int]:
        """Mesh coordinates (dp, pp, tp) of a global rank."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} out of range 0..{self.world_size - 1}")
        rest, t = divmod(rank, self.tp)
        d, p = divmod(rest, self.pp)
        return d, p, t

    def groups(self, axis: Axis) -> list[list[int]]:
        """Rank lists of the groups along ``axis``, ordered by their first rank."""
        r = self.rank_of
        dps, pps, tps = range(self.dp), range(self.pp), range(self.tp)
        if axis == "tp":
            return [[r(d, p, t) for t in tps] for d in dps for p in pps]
        if axis == "pp":
            return [[r(d, p, t) for p in pps] for d in dps for t in tps]
        if axis == "dp":
            return [[r(d, p, t) for d in dps] for p in pps for t in tps]
        if axis == "ep":
            if self.ep == 1:
                return [[rank] for rank in range(self.world_size)]
            if self.attention_dp:
                return [[r(d, p, t) for d in dps for t in tps] for p in pps]
            if self.ep_spans_stages:
                return [[r(d, p, t) for p in pps for t in tps] for d in dps]
            return self.groups("tp")
        raise ValueError(f"unknown axis {axis!r}; use dp, pp, tp or ep")

    def stage_layers(self, model: ModelSpec) -> list[tuple[int, int]]:
        """Half-open layer range of each pipeline stage; earlier stages take the remainder."""
        if self.pp > model.num_layers:
            raise LayoutError(_pp_message(self.pp, model))
        base, extra = divmod(model.num_layers, self.pp)
        ranges, start = [], 0
        for stage in range(self.pp):
            end = start + base + (1 if stage < extra else 0)
            ranges.append((start, end))
            start = end
        return ranges

    # --- fit to a model ----------------------------------------------------------------
    def validate_for(self, model: ModelSpec) -> None:
        """Raise LayoutError, naming the field and a fix, if the model cannot be split so."""
        if self.tp not in valid_tp(model):
            valid = ", ".join(map(str, valid_tp(model)))
            if model.num_attention_heads % self.tp:
                raise LayoutError(f"tp={self.tp} does not divide num_attention_heads="
                                  f"{model.num_attention_heads} of {model.name}; valid tp: {valid}")
            raise LayoutError(f"tp={self.tp} neither divides nor is a multiple of num_kv_heads="
                              f"{model.num_kv_heads} of {model.name}; valid tp: {valid}")
        if self.pp > model.num_layers:
            raise LayoutError(_pp_message(self.pp, model))
        if self.ep > 1 and not model.is_moe:
            raise LayoutError(f"ep={self.ep} needs an MoE model but {model.name} is dense; "
                              "use ep=1")
        if self.ep > 1 and model.num_routed_experts % self.ep:
            valid = ", ".join(str(e) for e in _divisors(model.num_routed_experts))
            raise LayoutError(f"ep={self.ep} does not divide num_routed_experts="
                              f"{model.num_routed_experts} of {model.name}; valid ep: {valid}")

    def kv_heads_per_rank(self, model: ModelSpec) -> int:
        """KV heads each TP rank stores. With tp > num_kv_heads each head is replicated on
        tp / num_kv_heads ranks (vLLM does the same). MLA's latent is not split by TP: every
        rank holds the whole latent, counted as one KV head."""
        if model.attention == "mla":
            return 1
        return max(1, model.num_kv_heads // self.tp)

    def kv_bytes_per_token_per_layer_per_rank(self, model: ModelSpec) -> int:
        """KV-cache bytes one rank stores per token for each of its layers."""
        if model.attention == "mla":
            return model.kv_bytes_per_token_per_layer
        return 2 * self.kv_heads_per_rank(model) * model.head_dim * model.kv_dtype_bytes


def valid_tp(model: ModelSpec) -> list[int]:
    """TP degrees that split ``model``'s heads: tp divides num_attention_heads and, for
    MHA/GQA, divides num_kv_heads or is a multiple of it (KV heads then replicate)."""
    def kv_ok(tp: int) -> bool:
        kv = model.num_kv_heads
        return model.attention == "mla" or (kv % tp == 0 if tp <= kv else tp % kv == 0)

    return [tp for tp in _divisors(model.num_attention_heads) if kv_ok(tp)]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _pp_message(pp: int, model: ModelSpec) -> str:
    return (f"pp={pp} exceeds num_layers={model.num_layers} of {model.name}; use pp <= "
            f"{model.num_layers}")
