"""Everything a run needs, built once from a RunConfig: the shared set-up of `simulate` and
`emulate` (so the two differ only in how plans are executed)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydantic import ValidationError

from emulator.config import RunConfig
from emulator.core.requests import RequestTable
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


def build_run(config: RunConfig, *, record_slots: bool = False) -> RunSetup:
    model = get_model(config.model)
    hardware = get_hardware(config.hardware)
    layout = make_layout(config)
    layout.validate_for(model)
    memory = plan_memory(model, hardware, layout,
                         gpu_memory_utilization=config.gpu_memory_utilization,
                         block_size=config.block_size)
    profile = load_profile(config.comm_profile) if config.comm_profile else None
    cost = CostModel(model, hardware, layout, profile)
    scheduler_config = SchedulerConfig(
        max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
        block_size=config.block_size, enable_chunked_prefill=config.enable_chunked_prefill,
        record_slots=record_slots)
    trace = load_run_trace(config)
    return RunSetup(config=config, trace=trace, model=model, hardware=hardware, layout=layout,
                    memory=memory, cost=cost, scheduler_config=scheduler_config)
