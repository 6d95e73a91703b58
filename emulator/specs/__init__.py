"""Model, hardware, parallel layout and memory plan: pure descriptions, no I/O but for
reading a Hugging Face config.json in :func:`from_hf_config`."""

from emulator.specs.hardware import HARDWARE_PRESETS, HardwareSpec, get_hardware
from emulator.specs.layout import ParallelLayout, valid_tp
from emulator.specs.memory import (
    MemoryPlan, plan_memory, stage_kv_bytes_per_block, stage_weight_bytes)
from emulator.specs.model import MODEL_PRESETS, ModelSpec, from_hf_config, get_model

__all__ = [
    "HARDWARE_PRESETS", "HardwareSpec", "get_hardware",
    "MODEL_PRESETS", "ModelSpec", "from_hf_config", "get_model",
    "ParallelLayout", "valid_tp",
    "MemoryPlan", "plan_memory", "stage_kv_bytes_per_block", "stage_weight_bytes",
]
