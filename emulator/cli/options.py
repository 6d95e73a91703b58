"""Click options generated from RunConfig fields, so flags, config files and help agree.

Only the fields named by a command become flags (a short, explicit list per command); the
help text is the field's description. Every flag defaults to None so that a value from
`--config FILE` is overridden only by flags the user actually gave.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any, Callable

import click

from emulator.config import RunConfig

COMMON_FIELDS = (
    "trace", "model", "hardware", "dp", "tp", "pp", "ep", "attention_dp", "max_num_seqs",
    "max_num_batched_tokens", "block_size", "enable_chunked_prefill", "kv_watermark",
    "gpu_memory_utilization",
    "router", "comm_profile", "max_requests", "max_output_tokens",
    "expert_skew", "zipf_s", "expert_popularity", "routing_seed", "dispatch_dtype",
    "eplb_redundant_experts",
)
EMULATION_FIELDS = ("dilation", "memory_scale", "backend", "address", "timeout_s", "delay_mode",
                     "keep_awake", "rank_priority", "pin_ranks", "driver_priority",
                     "run_ahead")


def _click_type(annotation: Any) -> Any:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = args[0] if args and typing.get_origin(annotation) is not typing.Literal else annotation
    if typing.get_origin(base) is typing.Literal:
        return click.Choice([str(v) for v in typing.get_args(base)])
    if base is Path:
        return click.Path(path_type=Path)
    return {int: int, float: float, str: str}.get(base, str)


def config_options(fields: tuple[str, ...]) -> Callable[[Callable], Callable]:
    """Decorator adding one option per RunConfig field plus `--config FILE`."""

    def decorate(func: Callable) -> Callable:
        for name in reversed(fields):
            info = RunConfig.model_fields[name]
            flag = "--" + name.replace("_", "-")
            default = info.default if info.default is not None and not info.is_required() else None
            help_text = (info.description or "") + (f" [default: {default}]" if default is not None else "")
            if info.annotation is bool:
                func = click.option(f"{flag}/--no-{name.replace('_', '-')}", name, default=None,
                                    help=help_text)(func)
            else:
                func = click.option(flag, name, type=_click_type(info.annotation), default=None,
                                    help=help_text)(func)
        func = click.option("--config", "config_file", type=click.Path(path_type=Path),
                            default=None, help="YAML or JSON run config; flags override it.")(func)
        return func

    return decorate
