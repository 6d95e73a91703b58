"""Shared made-up hardware for exact hand-computed values: 1 TFLOP/s, 100 GB/s HBM, no
efficiency loss, no launch overhead; scale-up 10 GB/s / 1 us, scale-out 1 GB/s / 10 us."""

import pytest

from emulator.specs.hardware import HardwareSpec
from emulator.specs.model import MODEL_PRESETS


@pytest.fixture
def hw() -> HardwareSpec:
    return HardwareSpec(
        name="toy", peak_flops_per_s=1e12, hbm_bytes=10**10, hbm_bytes_per_s=1e11,
        scale_up_bytes_per_s=1e10, scale_up_latency_s=1e-6, scale_out_bytes_per_s=1e9,
        scale_out_latency_s=1e-5, gpus_per_node=2, mfu=1.0, mbu=1.0, launch_overhead_s=0.0)


@pytest.fixture
def tiny():
    # 4 layers, hidden 256, 8 heads / 4 kv heads of 32, intermediate 512, vocab 1024, bf16.
    return MODEL_PRESETS["tiny"]


@pytest.fixture
def tiny_moe():
    # As tiny; layer 0 dense, layers 1-3 MoE: 8 experts top-2 of width 128, 1 shared expert.
    return MODEL_PRESETS["tiny-moe"]
