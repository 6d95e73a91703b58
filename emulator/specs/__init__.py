"""Model, hardware, parallel layout and memory plan: pure descriptions, no I/O but for
reading a Hugging Face config.json in :func:`from_hf_config`."""

from emulator.specs.hardware import HARDWARE_PRESETS, HardwareSpec, get_hardware
from emulator.specs.model import MODEL_PRESETS, ModelSpec, from_hf_config, get_model

__all__ = [
    "HARDWARE_PRESETS", "HardwareSpec", "get_hardware",
    "MODEL_PRESETS", "ModelSpec", "from_hf_config", "get_model",
]
