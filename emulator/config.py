"""The run configuration: one pydantic model composed of the pieces a run needs.

The CLI builds it from flags and/or a YAML or JSON file (`--config run.yaml`); flags given on
the command line override the file. Both `simulate` and `emulate` take the same config, so a
validation run compares the two on identical settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from emulator.errors import ConfigError


class RunConfig(BaseModel):
    """Everything that determines a simulation or emulation run."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    trace: Path = Field(description="Request trace (.arrow or .parquet, schema v1).")
    model: str = Field("llama-3.1-8b", description="Model preset id or path to a local HF config.json.")
    hardware: str = Field("h100", description="Target GPU preset id (a100-80g, h100, h200, b200, mi300x).")
    dp: int = Field(1, ge=1, description="Data-parallel replicas (independent KV pools).")
    tp: int = Field(1, ge=1, description="Tensor-parallel degree (ranks per TP group).")
    pp: int = Field(1, ge=1, description="Pipeline-parallel stages.")
    ep: int = Field(1, ge=1, description="Expert-parallel degree (MoE only).")
    attention_dp: bool = Field(False, description="MoE: attention data-parallel with experts spread over the same ranks (ep = dp * tp).")
    max_num_seqs: int = Field(256, ge=1, description="Maximum running sequences per replica (vLLM max_num_seqs).")
    max_num_batched_tokens: int = Field(8192, ge=1, description="Token budget per step (vLLM max_num_batched_tokens).")
    block_size: int = Field(16, ge=1, description="KV block size in tokens.")
    enable_chunked_prefill: bool = Field(True, description="Split long prompts across steps within the token budget.")
    kv_watermark: float | None = Field(None, ge=0, lt=1, description="Fraction of KV blocks an admission must leave free (vLLM v0 watermark); default 0 without PP, 0.01 with PP.")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="Fraction of HBM for weights + KV cache + activations.")
    router: Literal["round_robin", "least_outstanding", "least_kv"] = Field(
        "least_outstanding", description="How requests are assigned to DP replicas.")
    comm_profile: Path | None = Field(None, description="Calibrated communication profile (JSON from `emulator calibrate`); default: from the hardware spec.")
    max_requests: int | None = Field(None, ge=1, description="Use only the first N requests of the trace.")
    max_output_tokens: int | None = Field(None, ge=1, description="Cap every request's output length (laptop-scale runs).")
    # MoE routing (used when the model is MoE and ep > 1).
    expert_skew: Literal["uniform", "zipf", "file"] = Field("uniform", description="MoE expert popularity: uniform, zipf (exponent zipf_s) or file (expert_popularity).")
    zipf_s: float = Field(1.0, ge=0, description="Zipf exponent of expert popularity with expert_skew=zipf (0 = uniform).")
    expert_popularity: Path | None = Field(None, description="File of one non-negative weight per routed expert (JSON list, or numbers separated by commas/whitespace) for expert_skew=file.")
    routing_seed: int = Field(0, ge=0, description="Seed of the MoE gating (hidden states, router weights, Zipf permutation).")
    dispatch_dtype: Literal["bf16", "fp8"] = Field("bf16", description="Element type of the MoE dispatch all-to-all (fp8: 1 byte per element); the combine is always bf16.")
    eplb_redundant_experts: int = Field(0, ge=0, description="Extra copies of hot experts placed EPLB-style (experts + copies must divide by ep); 0 = contiguous placement.")
    # Emulation only.
    dilation: float = Field(1.0, gt=0, description="Emulated wall time per unit of target compute time (delays are cost x dilation).")
    memory_scale: float = Field(1e-3, gt=0, le=1, description="Fraction of the real weight and KV bytes each worker really allocates.")
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="torch.distributed backend (auto: nccl with GPUs, else gloo).")
    address: str | None = Field(None, description="Ray cluster to join ('auto' or HOST:PORT); default: an embedded local Ray.")
    timeout_s: float = Field(60.0, gt=0, description="Timeout of every rendezvous and collective, seconds.")
    delay_mode: Literal["auto", "sleep", "spin"] = Field(
        "auto", description="How workers wait out compute delays: sleep, spin (keeps the CPU awake, so a following collective is not slowed by a wake-up, but holds a core), or auto (sleep when keep_awake is on, else spin when every rank has a core).")
    keep_awake: Literal["auto", "on", "off"] = Field(
        "auto", description="Run one idle-priority (SCHED_IDLE) spinner per CPU on each node while the workers live, so idle virtual CPUs do not add milliseconds of wake-up to every collective; auto: on with the gloo backend.")
    rank_priority: Literal["auto", "realtime", "normal"] = Field(
        "auto", description="CPU priority of the ranks' threads: realtime (SCHED_FIFO 2: a rank that wakes preempts the driver and Ray's daemons at once, instead of waiting up to a time slice; needs slept delays and root or an rtprio limit), normal, or auto (realtime on the gloo backend when delays are slept and it is permitted).")

    driver_priority: Literal["auto", "realtime", "normal"] = Field(
        "auto", description="CPU priority of the driver's threads while the workers live: realtime (SCHED_FIFO 1, one below the ranks: its work between steps is not held up by Ray's daemons, and a rank that wakes still preempts it; needs root or an rtprio limit), normal, or auto (realtime when a rank on the driver's host runs at real-time priority).")

    run_ahead: bool = Field(True, description="Once every request has arrived (an offline batch: from the start), submit each replica's next plan while its steps run, so that it starts when the step before it ends instead of a driver round trip later (the plans are the same: the scheduler never reads the clock). Off: every plan waits for the step before it to report (`validate` runs so: its host probes price that loop's gap between steps).")
    thermometer: bool = Field(False, description="Thermometer probes (set by `validate`): in every step each stage repeats the first TP all-reduce of its middle layer, back to back (tp > 1 only), measuring the host's collective speed during the run; the simulator prices it too.")
    pin_ranks: Literal["auto", "on", "off"] = Field(
        "auto", description="Pin each rank's threads to a CPU of its own (round robin over a node's CPUs): on, off, or auto (on with the gloo backend when a node has a CPU for every rank and one more for the driver and Ray). Floating ranks move between CPUs at their wake-ups; pinned ones cannot move away from the driver.")

    @model_validator(mode="before")
    @classmethod
    def _older_fields(cls, data: Any) -> Any:
        """Runs written before the thermometer repeated its step's all-reduce gave it a size
        of its own (``thermometer_bytes``); re-reporting one prices its thermometer as now."""
        if isinstance(data, dict) and "thermometer_bytes" in data:
            data = dict(data)
            on = bool(data.pop("thermometer_bytes"))
            data.setdefault("thermometer", on)
        return data

    @model_validator(mode="after")
    def _check(self) -> "RunConfig":
        if self.attention_dp and self.ep != self.dp * self.tp:
            raise ValueError(f"attention_dp needs ep = dp * tp = {self.dp * self.tp}, got ep={self.ep}")
        if self.expert_skew == "file" and self.expert_popularity is None:
            raise ValueError("expert_skew=file needs expert_popularity (a file of one weight per routed expert)")
        if self.expert_popularity is not None and self.expert_skew != "file":
            raise ValueError(f"expert_popularity is set but expert_skew={self.expert_skew}; set expert_skew=file or drop expert_popularity")
        if self.rank_priority == "realtime" and self.delay_mode == "spin":
            raise ValueError("rank_priority=realtime needs slept delays, got delay_mode=spin (a spinning real-time rank would starve every other process on its CPU); use delay_mode=sleep or auto, or rank_priority=auto")
        return self

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp


def _fmt_validation_error(exc: ValidationError, source: str) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "config"
        parts.append(f"{loc}: {err['msg']}")
    return f"{source}: " + "; ".join(parts)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON run config file into a dict (YAML is a superset of JSON)."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML/JSON: {exc}".splitlines()[0]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of settings, got {type(data).__name__}")
    return {k.replace("-", "_"): v for k, v in data.items()}


def build_config(file: str | Path | None = None, **overrides: Any) -> RunConfig:
    """Merge a config file (if any) with explicit overrides (flags) and validate."""
    values: dict[str, Any] = load_config_file(file) if file else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return RunConfig(**values)
    except ValidationError as exc:
        raise ConfigError(_fmt_validation_error(exc, str(file) if file else "run config")) from None
