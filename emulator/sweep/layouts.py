"""The layouts a sweep runs: every (DP, TP, PP, EP) combination of N GPUs that the specs
accept for the model and whose weights and at least one KV block fit the hardware, plus the
ones skipped and why.

Enumerated: every ``dp * tp * pp == N`` with ``tp`` at most ``gpus_per_node`` (TP peers share
one scale-up domain, DESIGN section 4). For an MoE model, each of the EP groupings the
layout supports (:mod:`emulator.specs.layout`): ``ep = 1`` (experts split by TP), ``ep = tp``,
``ep = tp * pp`` (pp > 1) and attention data parallelism with ``ep = dp * tp`` (dp > 1).
A layout is valid when ``ParallelLayout(...).validate_for(model)`` and ``plan_memory`` pass;
the others are returned with the LayoutError's message.

Names (printed and accepted by ``--layouts``): the degrees above 1 joined by ``-``, e.g.
``dp2-tp4``, ``tp4-pp2-ep8``, ``dp8-ep8-adp`` (``adp``: attention data parallelism);
``tp1`` for one GPU.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydantic import ValidationError

from emulator.errors import ConfigError, LayoutError
from emulator.specs import HardwareSpec, ModelSpec, ParallelLayout, plan_memory


@dataclass(frozen=True, slots=True)
class Skipped:
    """A layout that cannot run, and the reason (the specs' one-line message)."""

    name: str
    reason: str


def layout_name(layout: ParallelLayout) -> str:
    parts = [f"{axis}{getattr(layout, axis)}" for axis in ("dp", "tp", "pp", "ep")
             if getattr(layout, axis) > 1]
    if layout.attention_dp:
        parts.append("adp")
    return "-".join(parts) or "tp1"


_TOKEN = re.compile(r"(dp|tp|pp|ep)(\d+)|(adp)")


def parse_layout(text: str) -> dict[str, int | bool]:
    """Degrees of one layout name such as ``dp2-tp4`` (separators ``-``, ``x``, ``.``,
    ``_`` or none); ConfigError naming the text if it is not one."""
    spec = text.strip().lower()
    degrees: dict[str, int | bool] = {}
    pos = 0
    for match in _TOKEN.finditer(spec):
        if spec[pos:match.start()].strip("-x._ ") or match.start() < pos:
            break
        if match.group(3):
            degrees["attention_dp"] = True
        else:
            axis, value = match.group(1), int(match.group(2))
            if axis in degrees or value < 1:
                raise ConfigError(f"layout {text!r}: {axis} given twice or < 1; write e.g. dp2-tp4")
            degrees[axis] = value
        pos = match.end()
    if not degrees or spec[pos:].strip("-x._ "):
        raise ConfigError(f"layout {text!r} is not a layout name; write degrees such as "
                          "dp2-tp4, tp4-pp2-ep8 or dp8-ep8-adp")
    return degrees


def check_layout(layout: ParallelLayout, model: ModelSpec, hardware: HardwareSpec, *,
                 gpu_memory_utilization: float, block_size: int) -> str | None:
    """None if ``layout`` can run ``model`` on ``hardware``, else the reason it cannot."""
    if layout.tp > hardware.gpus_per_node:
        return (f"tp={layout.tp} exceeds the {hardware.gpus_per_node} GPUs of one "
                f"{hardware.name} node (TP peers share a scale-up domain)")
    try:
        layout.validate_for(model)
        plan_memory(model, hardware, layout, gpu_memory_utilization=gpu_memory_utilization,
                    block_size=block_size)
    except LayoutError as exc:
        return str(exc)
    return None


def _candidates(model: ModelSpec, num_gpus: int) -> list[dict[str, int | bool]]:
    out = []
    for dp in range(1, num_gpus + 1):
        if num_gpus % dp:
            continue
        for tp in range(1, num_gpus // dp + 1):
            if (num_gpus // dp) % tp:
                continue
            pp = num_gpus // (dp * tp)
            out.append({"dp": dp, "tp": tp, "pp": pp})
            if not model.is_moe:
                continue
            eps = [{"ep": tp}] if tp > 1 else []
            if pp > 1:
                eps.append({"ep": tp * pp})
            if dp > 1:
                eps.append({"ep": dp * tp, "attention_dp": True})
            out.extend({"dp": dp, "tp": tp, "pp": pp, **e} for e in eps)
    return out


def enumerate_layouts(model: ModelSpec, hardware: HardwareSpec, num_gpus: int, *,
                      gpu_memory_utilization: float = 0.9, block_size: int = 16,
                      only: list[str] | None = None) -> tuple[list[ParallelLayout], list[Skipped]]:
    """(valid layouts, skipped layouts with reasons) for ``num_gpus`` GPUs; ``only``: the
    layout names to consider instead of all (each must use exactly ``num_gpus`` GPUs)."""
    if num_gpus < 1:
        raise ConfigError(f"--gpus {num_gpus} must be at least 1")
    if only is None:
        candidates = _candidates(model, num_gpus)
    else:
        candidates = [parse_layout(name) for name in only]
    valid: list[ParallelLayout] = []
    skipped: list[Skipped] = []
    seen: set[str] = set()
    for degrees in candidates:
        name = "-".join(f"{k}{v}" for k, v in degrees.items() if v is not True and v > 1)
        try:
            layout = ParallelLayout(**degrees)
        except ValidationError as exc:
            reason = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
            skipped.append(Skipped(name or "tp1", reason))
            continue
        name = layout_name(layout)
        if name in seen:
            continue
        seen.add(name)
        if layout.world_size != num_gpus:
            raise ConfigError(f"layout {name} uses {layout.world_size} GPUs, not --gpus "
                              f"{num_gpus}")
        reason = check_layout(layout, model, hardware,
                              gpu_memory_utilization=gpu_memory_utilization,
                              block_size=block_size)
        if reason is None:
            valid.append(layout)
        else:
            skipped.append(Skipped(name, reason))
    return valid, skipped
