"""The pure serving core: request table, KV block pool and manager, scheduler, router, and
the BatchPlan/StepResult contract. No Ray, no torch, no clock, no files."""

from emulator.core.block_pool import BlockPool
from emulator.core.kv_manager import KVManager
from emulator.core.plan import BatchPlan, Executor, StepResult
from emulator.core.requests import RequestTable, Status
from emulator.core.router import Router
from emulator.core.scheduler import Scheduler, SchedulerConfig

__all__ = ["BatchPlan", "BlockPool", "Executor", "KVManager", "RequestTable", "Router",
           "Scheduler", "SchedulerConfig", "Status", "StepResult"]
