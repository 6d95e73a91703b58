"""Fault injection for tests of the failure paths (a test hook, not a user feature).

``EMULATOR_FAULT`` in the environment of the process running ``emulator emulate`` arms one
fault; the emulation loop (executor.Emulation) fires it once ``step`` steps have finished:

    EMULATOR_FAULT=kill:rank=1:step=3   rank 1's worker process kills itself (SIGKILL), as
                                        the kernel's OOM killer would
    EMULATOR_FAULT=skip:rank=1:step=2   rank 1 silently skips its next collective, so its
                                        peers wait in one that never completes

Only the runtime layer reads the variable (never the pure layers or the config), and it is
deliberately undocumented outside this docstring and the tests.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass

from emulator.errors import ConfigError

ENV_VAR = "EMULATOR_FAULT"
KINDS = ("kill", "skip")


@dataclass(frozen=True, slots=True)
class Fault:
    """One armed fault: ``kind`` on ``rank`` once ``step`` steps have finished."""

    kind: str
    rank: int
    step: int


def parse_fault(text: str) -> Fault:
    """``kind:rank=R:step=S`` -> Fault; ConfigError naming the variable otherwise."""
    kind, *fields = text.strip().split(":")
    values: dict[str, int] = {}
    for item in fields:
        key, sep, value = item.partition("=")
        if not sep or key not in ("rank", "step") or not value.isdigit():
            break
        values[key] = int(value)
    else:
        if kind in KINDS and set(values) == {"rank", "step"}:
            return Fault(kind, values["rank"], values["step"])
    raise ConfigError(f"{ENV_VAR}={text!r} is not KIND:rank=R:step=S with KIND in "
                      f"{'/'.join(KINDS)} (e.g. kill:rank=1:step=3); unset it")


def fault_from_env(environ: Mapping[str, str] = os.environ) -> Fault | None:
    text = environ.get(ENV_VAR, "")
    return parse_fault(text) if text else None


def _kill_self(_actor) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def inject(fault: Fault, group) -> None:
    """Fire ``fault`` on ``group`` (a cluster.WorkerGroup); returns without waiting."""
    if not 0 <= fault.rank < len(group.actors):
        raise ConfigError(f"{ENV_VAR}: rank {fault.rank} is not a rank of this layout "
                          f"(0..{len(group.actors) - 1})")
    if fault.kind == "kill":
        # Runs inside the worker, after the steps already queued on it: the process dies as
        # a crashed or OOM-killed one would, on whichever node it lives.
        group.actors[fault.rank].__ray_call__.remote(_kill_self)
    else:
        group.skip_next_collective(fault.rank)
