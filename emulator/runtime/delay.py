"""Compute delays: the emulator replaces each compute operation by a delay of
``modeled_time_s * dilation`` (DESIGN.md section 3).

On CPU the delay is slept on the calling thread: :func:`precise_sleep` sleeps most of it and
spins the rest, because ``time.sleep`` overshoots by ~60-100 us on Linux (timer slack plus
scheduler wake-up), which would add a systematic error of that size to every layer.

On a CUDA worker the delay belongs on the compute stream (:class:`CudaStreamDelay`) so that
it overlaps with communication as a real kernel would. CUDA is touched only when that class
is instantiated; CPU machines never import or initialise it.
"""

from __future__ import annotations

import time

SPIN_S = 200e-6
"""The tail of a delay that is busy-waited rather than slept (covers sleep overshoot)."""
REALTIME_SPIN_S = 50e-6
"""The spun tail for a rank at real-time priority, which wakes from a sleep on time
(runtime.awake: overshoot 23-31 us median, p90 26-53 us, on the development VM)."""


def precise_sleep(seconds: float, spin_s: float = SPIN_S) -> float:
    """Block the calling thread for ``seconds`` and return the seconds actually elapsed.

    Sleeps until ``spin_s`` before the deadline, then spins on ``time.perf_counter``
    (``spin_s=math.inf`` spins the whole delay). A non-positive ``seconds`` returns at once
    (0.0 elapsed is still measured, not assumed).
    """
    start = time.perf_counter()
    if seconds <= 0.0:
        return time.perf_counter() - start
    deadline = start + seconds
    coarse_s = seconds - spin_s
    if coarse_s > 0.0:
        time.sleep(coarse_s)
    while time.perf_counter() < deadline:
        pass
    return time.perf_counter() - start


def spin_for(mode: str, ranks_on_node: int, cpus_on_node: int,
             keep_awake: bool = False) -> float:
    """The spun tail of every delay for a delay mode.

    ``sleep``: sleep, spin the last SPIN_S. ``spin``: spin the whole delay. A rank that
    sleeps lets its (virtual) CPU go idle, and waking it costs the next collective
    milliseconds on a VM (measured here: a 256 KiB gloo all-reduce takes ~0.35 ms back to
    back, ~2 ms right after a sleep, ~0.8 ms after a spin). Idle-priority spinners
    (runtime.awake, ``keep_awake``) remove that cost without taking a core from the ranks,
    and then sleeping is best: a spinning rank holds the core its peer's communication
    threads need. ``auto``: sleep with ``keep_awake``; otherwise spin when the node has a core
    for every rank on it, and sleep when it has not (spinning ranks would starve each
    other)."""
    if mode == "spin" or (mode == "auto" and not keep_awake and ranks_on_node <= cpus_on_node):
        return float("inf")
    if mode in ("sleep", "auto"):
        return SPIN_S
    raise ValueError(f"delay mode must be auto, sleep or spin, got {mode!r}")


class CudaStreamDelay:
    """Delays enqueued on the current CUDA stream with ``torch.cuda._sleep(cycles)``.

    ``_sleep`` spins a kernel for a number of GPU clock cycles, so the cycles per second are
    calibrated once at construction by timing a known cycle count with CUDA events. The call
    returns immediately (the delay runs asynchronously on the stream), which is what lets a
    following NCCL collective on another stream overlap with it.
    """

    def __init__(self, device: int | None = None, *, calibration_cycles: int = 10_000_000) -> None:
        import torch  # local: CPU-only code paths never need torch.cuda

        if not torch.cuda.is_available():
            raise RuntimeError("CudaStreamDelay needs a CUDA device; use precise_sleep on CPU")
        self._torch = torch
        if device is not None:
            torch.cuda.set_device(device)
        torch.cuda._sleep(1000)  # warm-up: first launch carries context creation
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(calibration_cycles)
        end.record()
        end.synchronize()
        elapsed_s = start.elapsed_time(end) / 1e3  # elapsed_time is in milliseconds
        self.cycles_per_s = calibration_cycles / elapsed_s

    def enqueue(self, seconds: float) -> None:
        """Put a delay of ``seconds`` on the current stream (returns before it runs)."""
        cycles = int(seconds * self.cycles_per_s)
        if cycles > 0:
            self._torch.cuda._sleep(cycles)
