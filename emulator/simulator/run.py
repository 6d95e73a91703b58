"""`simulate`: build the run from a config, drive the event loop, return the tables."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from emulator.build import RunSetup, build_run
from emulator.config import RunConfig
from emulator.core.requests import RequestTable, Status
from emulator.metrics.records import RequestRecords
from emulator.simulator.engine import Simulation


@dataclass
class RunTables:
    """The tables of one run (DESIGN section 7), before they are written."""

    requests: pa.Table
    steps: pa.Table
    collectives: pa.Table | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    moe: pa.Table | None = None
    """Per-MoE-layer EP records (emulations of MoE models with ep > 1), else None."""


def request_table(requests: RequestTable) -> RequestRecords:
    return RequestRecords.from_arrays(
        request_id=requests.request_id, replica=requests.replica, arrival_s=requests.arrival_s,
        first_token_s=requests.first_token_s, finish_s=requests.finish_s,
        prompt_tokens=requests.prompt_tokens, output_tokens=requests.output_tokens,
        num_preemptions=requests.num_preemptions)


def run_extra(setup: RunSetup, requests: RequestTable) -> dict[str, Any]:
    """Facts about the run that are not in the tables: memory plan and rejections."""
    mem = setup.memory
    rejected = sorted(requests.rejections.items())
    return {
        "memory": {"num_kv_blocks_per_replica": mem.num_kv_blocks, "block_size": mem.block_size,
                   "kv_capacity_tokens_per_replica": mem.kv_capacity_tokens,
                   "weight_bytes_per_rank": mem.weight_bytes_per_rank},
        "num_rejected": int((requests.status == Status.REJECTED).sum()),
        "rejections": [reason for _, reason in rejected[:20]],
    }


def simulate(setup: RunSetup, *, on_progress: Callable[[int], None] | None = None,
             fast_forward: bool = True) -> RunTables:
    """Simulate ``setup`` and return its tables (nothing is written)."""
    requests = setup.new_requests()
    sim = Simulation(requests, setup.new_schedulers(requests), setup.new_router(), setup.cost,
                     fast_forward=fast_forward)
    sim.run(on_progress)
    return RunTables(requests=request_table(requests).to_table(), steps=sim.steps.to_table(),
                     extra=run_extra(setup, requests))


def run_simulation(config: RunConfig, **kwargs: Any) -> RunTables:
    return simulate(build_run(config), **kwargs)
