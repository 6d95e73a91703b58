"""Keeping a host's CPUs awake while the ranks wait: idle-priority spinner processes.

A virtual CPU with nothing to run halts, and waking it (an inter-processor interrupt through
the hypervisor) takes far longer than on bare metal. A gloo collective is a chain of such
wake-ups (the caller hands the op to gloo's worker thread, each message wakes the peer's
socket loop), so on an idle VM it is slow, and slowest right after a compute delay.
Measured on the 2-vCPU development VM with two plain torch.distributed processes (no Ray),
median all-reduce of 64 KiB: 0.3-0.5 ms back to back, 2.8-2.9 ms right after a 1 ms
``time.sleep``; with one idle-priority spinner per CPU the same all-reduce takes 0.2-0.4 ms
in both cases.

A spinner runs under ``SCHED_IDLE`` (Linux; nice 19 elsewhere): the kernel runs it only when
no other thread wants the CPU and preempts it at once when one wakes, so it keeps the CPU out
of its idle state without taking time from the ranks or anyone else. It costs a busy core in
``top`` and power, so it is used on CPU (gloo) hosts only, and exits by itself within
milliseconds of its parent's death (it polls its parent pid), so a killed rank leaves none.
"""

from __future__ import annotations

import os
import subprocess
import sys

SPINNER_CODE = """\
import os, sys
try:
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
except (AttributeError, OSError):
    os.nice(19)
parent = int(sys.argv[1])
while os.getppid() == parent:
    for _ in range(100000):
        pass
"""


def cpus_available() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def spinners_for(local_index: int, ranks_on_node: int, cpus: int) -> int:
    """How many spinners the rank at ``local_index`` of ``ranks_on_node`` starts so that the
    node has one per CPU in total (earlier ranks take the remainder)."""
    if not 0 <= local_index < ranks_on_node:
        raise ValueError(f"local index {local_index} outside 0..{ranks_on_node - 1}")
    return cpus // ranks_on_node + (1 if local_index < cpus % ranks_on_node else 0)


def wants_keep_awake(mode: str, backend: str) -> bool:
    """``on``, ``off``, or ``auto`` (on with the CPU backend: GPU ranks wait on the device)."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"keep-awake mode must be auto, on or off, got {mode!r}")
    return mode == "on" or (mode == "auto" and backend == "gloo")


class IdleSpinners:
    """Spinner processes owned by this process (a rank)."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen] = []

    @property
    def count(self) -> int:
        return sum(p.poll() is None for p in self._procs)

    def start(self, num: int) -> int:
        """Run ``num`` spinners (after stopping any running); returns how many run."""
        self.stop()
        self._procs = [subprocess.Popen(
            [sys.executable, "-c", SPINNER_CODE, str(os.getpid())],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            close_fds=True) for _ in range(max(0, num))]
        return len(self._procs)

    def stop(self) -> None:
        for p in self._procs:
            p.terminate()
        for p in self._procs:
            try:
                p.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=2.0)
        self._procs = []
