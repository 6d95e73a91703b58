"""Everything a run needs, built once from a RunConfig: the shared set-up of `simulate` and
`emulate` (so the two differ only in how plans are executed)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from emulator.config import RunConfig
from emulator.core.requests import RequestTable
from emulator.core.routing import RoutingSpec
from emulator.core.router import Router
from emulator.core.scheduler import Scheduler, SchedulerConfig
from emulator.cost import CostModel, load_profile
from emulator.errors import ConfigError
from emulator.specs import (HardwareSpec, MemoryPlan, ModelSpec, ParallelLayout, get_hardware,
                            get_model, plan_memory)
from emulator.trace.io import read_trace
from emulator.trace.schema import Trace


@dataclass
class RunSetup:
    config: RunConfig
    trace: Trace
    model: ModelSpec
    hardware: HardwareSpec
    layout: ParallelLayout
    memory: MemoryPlan
    cost: CostModel
    scheduler_config: SchedulerConfig
    routing: RoutingSpec | None = None
    """MoE gating and expert placement (MoE models with ep > 1), shared by the cost model
    and the workers."""

    def new_requests(self) -> RequestTable:
        """Fresh per-request state for one run."""
        t = self.trace
        return RequestTable.from_columns(t.request_id, t.arrival_time_s, t.prompt_tokens,
                                         t.output_tokens, t.prefix_block_hashes)

    def new_schedulers(self, requests: RequestTable) -> list[Scheduler]:
        return [Scheduler(self.scheduler_config, self.memory.num_kv_blocks, requests,
                          num_micro_batches=self.layout.pp, replica=r)
                for r in range(self.layout.dp)]

    def new_router(self) -> Router:
        return Router(self.config.router, self.layout.dp)


def make_layout(config: RunConfig) -> ParallelLayout:
    try:
        return ParallelLayout(dp=config.dp, tp=config.tp, pp=config.pp, ep=config.ep,
                              attention_dp=config.attention_dp)
    except ValidationError as exc:
        msg = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
        raise ConfigError(f"layout dp={config.dp} tp={config.tp} pp={config.pp} "
                          f"ep={config.ep}: {msg}") from None


def load_run_trace(config: RunConfig) -> Trace:
    """The config's trace, cut to max_requests and with outputs capped at max_output_tokens."""
    trace = read_trace(config.trace)
    if config.max_requests is not None:
        trace = trace.head(config.max_requests)
    if config.max_output_tokens is not None:
        trace.output_tokens = np.minimum(trace.output_tokens, config.max_output_tokens).astype(np.int32)
        if trace.reasoning_tokens is not None:
            trace.reasoning_tokens = np.minimum(trace.reasoning_tokens, trace.output_tokens)
    return trace


def read_popularity(path: Path) -> np.ndarray:
    """Expert weights from a JSON list or a text file of numbers (commas/whitespace)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"expert_popularity {path}: cannot read: {exc.strerror}") from None
    try:
        values = json.loads(text) if text.lstrip().startswith("[") else [
            float(v) for v in text.replace(",", " ").split()]
        return np.asarray(values, dtype=np.float64)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"expert_popularity {path}: not a list of numbers ({exc}); write one "
                          "weight per routed expert, e.g. [4, 1, 1, 2]") from None


def make_routing(config: RunConfig, model: ModelSpec, layout: ParallelLayout) -> RoutingSpec | None:
    """The run's RoutingSpec, or None when no tokens cross an EP all-to-all."""
    if not model.is_moe or layout.ep == 1:
        if config.eplb_redundant_experts:
            raise ConfigError("eplb_redundant_experts needs an MoE model with ep > 1")
        return None
    values = read_popularity(config.expert_popularity) if config.expert_popularity else None
    return RoutingSpec.make(num_experts=model.num_routed_experts,
                            top_k=model.num_experts_per_tok, ep=layout.ep,
                            skew=config.expert_skew, zipf_s=config.zipf_s, values=values,
                            seed=config.routing_seed,
                            num_redundant=config.eplb_redundant_experts)


def check_emulation_layout(layout: ParallelLayout) -> None:
    """The emulator runs EP only over the TP ranks of one replica (ep == tp): with attention
    DP the EP group spans replicas that the emulation loop steps independently, and with
    ep == tp*pp a layer's all-to-all would need ranks busy with other stages."""
    if layout.ep > 1 and (layout.attention_dp or layout.ep != layout.tp):
        raise ConfigError(f"emulate supports ep=1 or ep=tp ({layout.tp}), got ep={layout.ep}"
                          f"{' with attention_dp' if layout.attention_dp else ''}; use "
                          "`emulator simulate` for this layout or set ep=tp")


def build_run(config: RunConfig, *, record_slots: bool = False) -> RunSetup:
    model = get_model(config.model)
    hardware = get_hardware(config.hardware)
    layout = make_layout(config)
    layout.validate_for(model)
    if record_slots:  # slots are recorded for the emulator only
        check_emulation_layout(layout)
    memory = plan_memory(model, hardware, layout,
                         gpu_memory_utilization=config.gpu_memory_utilization,
                         block_size=config.block_size)
    profile = load_profile(config.comm_profile) if config.comm_profile else None
    routing = make_routing(config, model, layout)
    cost = CostModel(model, hardware, layout, profile, routing=routing,
                     dispatch_dtype_bytes=1 if config.dispatch_dtype == "fp8" else None,
                     thermometer=config.thermometer)
    scheduler_config = SchedulerConfig(
        max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
        block_size=config.block_size, enable_chunked_prefill=config.enable_chunked_prefill,
        watermark=config.kv_watermark, record_slots=record_slots)
    trace = load_run_trace(config)
    return RunSetup(config=config, trace=trace, model=model, hardware=hardware, layout=layout,
                    memory=memory, cost=cost, scheduler_config=scheduler_config,
                    routing=routing)
