"""Target accelerators: the peak rates the cost model turns into time.

Every number is a vendor datasheet figure for one GPU, dense (no 2:4 sparsity) bf16.
Bytes are decimal (1 GB = 1e9 B) as on the datasheets; the real devices expose slightly
more (an H100 reports 81,559 MiB = 85.5e9 B), so capacities here are a little conservative.

Defaults shared by all presets, and why:
- ``mfu`` 0.5: large bf16 GEMMs reach 60-75% of the dense peak on H100/A100, attention and
  small prefill chunks much less; 0.5 is a middle value for a mixed serving step.
- ``mbu`` 0.8: memory-bound decode kernels (GEMV over weights, paged attention) sustain about
  80% of the HBM datasheet bandwidth.
- ``launch_overhead_s`` 10 us per layer: the floor of a decode step that is neither compute-
  nor bandwidth-bound (kernel launches and small-kernel tails, with CUDA graphs).
- Scale-out: one 400 Gb/s NIC per GPU (ConnectX-7 / InfiniBand NDR, or RoCE), 50 GB/s per
  direction, about 5 us end-to-end latency for a small message.
- Scale-up latency: about 2 us per NVLink / Infinity Fabric hop for a small message.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from emulator.errors import UserError


class HardwareSpec(BaseModel):
    """One accelerator type and its interconnects, per GPU."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, description="Hardware id, e.g. h100.")
    peak_flops_per_s: float = Field(gt=0, description="Dense bf16 tensor-core peak, FLOP/s.")
    hbm_bytes: int = Field(gt=0, description="Device memory capacity in bytes.")
    hbm_bytes_per_s: float = Field(gt=0, description="Device memory bandwidth, bytes/s.")
    scale_up_bytes_per_s: float = Field(
        gt=0, description="Scale-up (NVLink / Infinity Fabric) bandwidth per GPU, one "
        "direction, bytes/s.")
    scale_up_latency_s: float = Field(ge=0, description="Scale-up small-message latency, s.")
    scale_out_bytes_per_s: float = Field(
        gt=0, description="Scale-out NIC bandwidth per GPU, one direction, bytes/s.")
    scale_out_latency_s: float = Field(ge=0, description="Scale-out small-message latency, s.")
    gpus_per_node: int = Field(8, gt=0, description="GPUs sharing one scale-up domain.")
    mfu: float = Field(0.5, gt=0, le=1, description="Fraction of peak FLOP/s compute reaches.")
    mbu: float = Field(0.8, gt=0, le=1, description="Fraction of HBM bandwidth reached.")
    launch_overhead_s: float = Field(
        10e-6, ge=0, description="Per-layer floor of a step (kernel launches), s.")


_GB = 10**9
_NIC_400G_BYTES_PER_S = 50e9
_NIC_LATENCY_S = 5e-6
_SCALE_UP_LATENCY_S = 2e-6


def _preset(name: str, flops: float, hbm_gb: int, hbm_bw: float, scale_up: float) -> HardwareSpec:
    return HardwareSpec(
        name=name, peak_flops_per_s=flops, hbm_bytes=hbm_gb * _GB, hbm_bytes_per_s=hbm_bw,
        scale_up_bytes_per_s=scale_up, scale_up_latency_s=_SCALE_UP_LATENCY_S,
        scale_out_bytes_per_s=_NIC_400G_BYTES_PER_S, scale_out_latency_s=_NIC_LATENCY_S)


HARDWARE_PRESETS: dict[str, HardwareSpec] = {
    # NVIDIA A100 datasheet (SXM4 80GB): 312 TFLOPS bf16 dense (624 with sparsity),
    # 80 GB HBM2e at 2,039 GB/s; NVLink3 600 GB/s bidirectional = 300 GB/s per direction.
    "a100-80g": _preset("a100-80g", 312e12, 80, 2.039e12, 300e9),
    # NVIDIA H100 datasheet (SXM5): 989 TFLOPS bf16 dense (1,979 with sparsity), 80 GB HBM3
    # at 3.35 TB/s; NVLink4 900 GB/s bidirectional = 450 GB/s per direction.
    "h100": _preset("h100", 989e12, 80, 3.35e12, 450e9),
    # NVIDIA H200 datasheet (SXM): same compute die as H100, 141 GB HBM3e at 4.8 TB/s,
    # NVLink4 450 GB/s per direction.
    "h200": _preset("h200", 989e12, 141, 4.8e12, 450e9),
    # NVIDIA HGX/DGX B200 datasheet: 2.25 PFLOPS bf16 dense per GPU (36 PF sparse per
    # 8 GPUs), 8 TB/s; NVLink5 1.8 TB/s bidirectional = 900 GB/s per direction. Memory is the
    # shipping HGX B200 figure, 1,440 GB per 8 GPUs = 180 GB (the announced die has 192 GB).
    "b200": _preset("b200", 2.25e15, 180, 8.0e12, 900e9),
    # AMD Instinct MI300X datasheet: 1,307.4 TFLOPS bf16 dense, 192 GB HBM3 at 5.3 TB/s.
    # Infinity Fabric: 7 links per GPU, one to each peer of the 8-GPU platform, 64 GB/s per
    # direction each. We use the per-GPU aggregate, 7 x 64 = 448 GB/s per direction, which
    # only a collective spreading traffic over all peers (all-to-all, multi-ring all-reduce
    # across the 8 GPUs) can approach; one peer-to-peer transfer gets 64 GB/s.
    "mi300x": _preset("mi300x", 1307.4e12, 192, 5.3e12, 448e9),
}


def get_hardware(name: str) -> HardwareSpec:
    """A hardware preset by id (case-insensitive)."""
    spec = HARDWARE_PRESETS.get(name.lower())
    if spec is None:
        raise UserError(f"unknown hardware {name!r}; use one of {', '.join(HARDWARE_PRESETS)}")
    return spec
