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

Spinners keep the CPUs out of their idle state; they do not help a rank whose CPU is *busy*
when it wakes. With more runnable processes than CPUs (the driver, Ray's daemons and the
other ranks on a 2-core host at a small dilation) the scheduler lets a woken rank wait until
the running process's time slice ends: measured on the development VM, pipeline transfers
at dilation 1 took 0.25-1.4 ms (median, per run) instead of ~0.1 ms, and the median varied
5x between repeats. A rank at real-time priority (``SCHED_FIFO`` 2, one above the driver's; see
:func:`set_realtime`) preempts normal processes the moment it wakes: in the same runs the
wake-up costs the host probe measures fell to zero and the transfers to ~0.2 ms. It also
wakes from a sleep on time (timer slack is 0 for real-time threads: sleep overshoot 23-31
us median instead of 83-103 us), so less of each delay has to be spun. Real-time threads
only run that way while they sleep most of the time (the kernel keeps 5% of every second
for normal processes; a spinning real-time rank would take the rest), so the priority is
used with slept delays only.

Real-time ranks left to float over the CPUs move between them at their wake-ups. Pinning
each rank's threads to a CPU of its own (:func:`pin_threads`) helps them a little when
nothing else needs the CPUs: on the development VM, in windows alternating pinned and
floating within one run (two plain torch.distributed processes, a 256 KiB all-reduce after
a 1.6 ms delay), the pinned windows' median was 423 us against 479 us, lower in 15 of 20
pairs. It does not remove the host's own regimes: a back-to-back all-reduce of that size
takes ~240 us for tens of seconds, then ~400 us (benchmarks/bench_host_drift.py). But an
emulation's driver needs a CPU too: with both CPUs of the VM pinned to the two ranks of
PP=2 at dilation 1, the pipeline transfers took 273-276 us (median) and the run 0.76-0.79 s,
floating 142-200 us and 0.60-0.64 s. So ranks are pinned by default only where the node
keeps a CPU for the driver and Ray's daemons (:func:`wants_pinned`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from dataclasses import dataclass

from emulator.errors import ConfigError

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


RANK_RT_PRIORITY = 2
"""``SCHED_FIFO`` level of real-time ranks: above the driver's, so that a rank that wakes for
a transfer preempts a real-time driver busy with another micro-batch. At the same level it
waited: on the development VM, PP=2 at dilation 1 with ranks and driver both at 1 moved its
pipeline transfers from 0.17-0.28 ms (median per run; driver at normal priority) to
0.63-0.94 ms, with the ranks at 2 they took 0.18-0.35 ms (docs/results-validation.md,
repeat 10)."""
DRIVER_RT_PRIORITY = 1
"""``SCHED_FIFO`` level of a real-time driver (:class:`DriverPriority`)."""


def _affinity() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


_CPUS = _affinity()
"""The CPUs this process could run on when it started (before any :func:`pin_threads`)."""


def node_cpus() -> list[int]:
    """The ids of the CPUs this process could run on when it started; a rank pinned to
    CPU slot k runs on ``node_cpus()[k]``."""
    return list(_CPUS)


def cpus_available() -> int:
    """CPUs this process may run on (its affinity mask when it started, not the machine's
    count; a pinned rank still reports the node's)."""
    return len(_CPUS)


def spinners_for(local_index: int, ranks_on_node: int, cpus: int) -> int:
    """How many spinners the rank at ``local_index`` of ``ranks_on_node`` starts so that the
    node has one per CPU in total (earlier ranks take the remainder)."""
    if not 0 <= local_index < ranks_on_node:
        raise ValueError(f"local index {local_index} outside 0..{ranks_on_node - 1}")
    return cpus // ranks_on_node + (1 if local_index < cpus % ranks_on_node else 0)


@dataclass(frozen=True)
class HostMode:
    """How the ranks of an emulation wait (RunConfig's fields of the same names)."""

    delay_mode: str = "auto"
    """Compute delays slept, spun or auto (delay.spin_for)."""
    keep_awake: str = "auto"
    """Idle-priority spinners: auto, on, off (:func:`wants_keep_awake`)."""
    rank_priority: str = "auto"
    """auto, realtime, normal (:func:`wants_realtime`)."""
    pin_ranks: str = "auto"
    """auto, on, off (:func:`wants_pinned`)."""
    driver_priority: str = "auto"
    """auto, realtime, normal (:func:`wants_driver_realtime`)."""

    @classmethod
    def of(cls, config) -> "HostMode":
        """The host mode of a RunConfig (or anything with its five attributes)."""
        return cls(config.delay_mode, config.keep_awake, config.rank_priority,
                   config.pin_ranks, config.driver_priority)


def wants_pinned(mode: str, backend: str, ranks_on_node: int, cpus: int) -> bool:
    """Whether a node's ranks are pinned to CPUs (one each, round robin): ``on``; ``off``;
    ``auto``: on the CPU backend (gloo) when the node has a CPU for every rank and one more
    for the driver and Ray's daemons (a pinned rank cannot move away from them)."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"pin-ranks mode must be auto, on or off, got {mode!r}")
    return mode == "on" or (mode == "auto" and backend == "gloo" and ranks_on_node < cpus)


def wants_realtime(mode: str, backend: str, sleeps: bool, allowed: bool) -> bool:
    """Whether a rank runs at real-time priority. ``realtime`` needs slept delays
    (``sleeps``) and the permission (``allowed``: root or an rtprio limit), else raises;
    ``auto`` is realtime on the CPU backend when both hold; ``normal`` never."""
    if mode not in ("auto", "realtime", "normal"):
        raise ValueError(f"rank priority must be auto, realtime or normal, got {mode!r}")
    if mode == "realtime":
        if not sleeps:
            raise ValueError("rank priority realtime needs slept delays (delay mode sleep, "
                             "or auto with keep-awake on): a spinning real-time rank would "
                             "starve every other process on its CPU")
        if not allowed:
            raise ValueError("rank priority realtime is not permitted here (needs root, "
                             f"CAP_SYS_NICE or an rtprio limit >= {RANK_RT_PRIORITY}, see "
                             "`ulimit -r`); "
                             "use auto or normal")
        return True
    return mode == "auto" and backend == "gloo" and sleeps and allowed


def wants_driver_realtime(mode: str, ranks_realtime_here: bool, allowed: bool) -> bool:
    """Whether the driver's threads run at real-time priority while its workers live.
    ``realtime`` needs the permission (``allowed``), else raises; ``auto`` is realtime when
    a rank on the driver's host runs at real-time priority (``ranks_realtime_here``) and it
    is permitted; ``normal`` never. A driver at normal priority shares the CPUs with Ray's
    daemons between steps, and at small dilations its work between a micro-batch's steps
    is as long as the steps. On the 2-vCPU development VM, over seven interleaved pairs of
    PP=2 llama-3.1-8b runs at dilation 1 (real-time: the driver at SCHED_FIFO 1 below ranks
    at 2), the driver's busy time averaged 0.29 s at real-time priority against 0.40 s at
    normal, and the run 0.68 s against 0.76 s; in three of the seven pairs the real-time
    run was the slower one (by up to 0.08 s), as the host's speed moves between runs
    (docs/results-validation.md, repeat 10)."""
    if mode not in ("auto", "realtime", "normal"):
        raise ValueError(f"driver priority must be auto, realtime or normal, got {mode!r}")
    if mode == "realtime" and not allowed:
        # a user's setting: one line from the CLI, not a traceback
        raise ConfigError("driver priority realtime is not permitted here (needs root, "
                          "CAP_SYS_NICE or an rtprio limit >= 1, see `ulimit -r`); use "
                          "auto or normal")
    return mode == "realtime" or (mode == "auto" and ranks_realtime_here and allowed)


class DriverPriority:
    """Real-time priority of this process (the driver; ``SCHED_FIFO`` DRIVER_RT_PRIORITY,
    below the ranks') while at least one holder wants it:
    :meth:`hold` / :meth:`release` are counted, so nested worker groups (a host probe inside
    a run) leave it as the outermost one set it. A process that already ran at a real-time
    policy when first held is left as it was."""

    _lock = threading.Lock()
    _holds = 0
    _switched = False

    @classmethod
    def hold(cls) -> None:
        with cls._lock:
            if cls._holds == 0:
                policy = os.sched_getscheduler(0) & ~getattr(os, "SCHED_RESET_ON_FORK", 0)
                already = policy in (os.SCHED_FIFO, os.SCHED_RR)
                cls._switched = not already
                if cls._switched:
                    set_realtime(True, DRIVER_RT_PRIORITY)
            cls._holds += 1

    @classmethod
    def release(cls) -> None:
        with cls._lock:
            if cls._holds == 0:
                raise RuntimeError("DriverPriority.release without a hold")
            cls._holds -= 1
            if cls._holds == 0 and cls._switched:
                set_realtime(False)
                cls._switched = False

    @classmethod
    def holds(cls) -> int:
        return cls._holds


@dataclass(frozen=True)
class HostWaits:
    """How one rank waits, decided from a HostMode (:func:`decide`)."""

    keep_awake: bool
    """Whether the node's idle-priority spinners run."""
    spin_s: float
    """The spun tail of a compute delay; ``inf``: delays are spun whole."""
    realtime: bool
    """Whether the rank's threads run at real-time priority."""
    cpu_slot: int | None = None
    """Which of the node's CPUs (an index into them, in order) the rank's threads are
    pinned to; None: not pinned."""


def decide(mode: HostMode, backend: str, ranks_on_node: int, cpus: int,
           local_index: int = 0) -> HostWaits:
    """Spinners, spun tail, priority and CPU of the rank at ``local_index`` of the node's
    ``ranks_on_node`` in ``mode`` (raises ValueError for an impossible combination, e.g.
    realtime with spun delays)."""
    from emulator.runtime.delay import REALTIME_SPIN_S, spin_for

    awake = wants_keep_awake(mode.keep_awake, backend)
    spin_s = spin_for(mode.delay_mode, ranks_on_node, cpus, keep_awake=awake)
    sleeps = spin_s != float("inf")
    realtime = wants_realtime(mode.rank_priority, backend, sleeps,
                              mode.rank_priority != "normal" and realtime_allowed())
    slot = (local_index % cpus
            if wants_pinned(mode.pin_ranks, backend, ranks_on_node, cpus) else None)
    return HostWaits(awake, REALTIME_SPIN_S if realtime else spin_s, realtime, slot)


def realtime_allowed(priority: int | None = None) -> bool:
    """Whether this process may switch its threads to ``SCHED_FIFO`` at ``priority`` (default
    the ranks' level; tried on a child thread, so the caller's own policy is untouched)."""
    level = RANK_RT_PRIORITY if priority is None else priority
    if not hasattr(os, "SCHED_FIFO"):
        return False
    result: list[bool] = []

    def probe() -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(level))
            result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=probe)
    t.start()
    t.join()
    return result[0]


def set_realtime(on: bool, priority: int | None = None) -> int:
    """Put every thread of this process (the caller's, gloo's and Ray's) at real-time
    priority (``SCHED_FIFO`` at ``priority``, default RANK_RT_PRIORITY; reset on
    fork so spawned children run normally), or back to normal. Threads started later run
    at normal priority: the reset applies to threads too (checked on Linux: a thread started
    by a real-time thread runs SCHED_OTHER), so this is called once the process has the
    threads that matter (ranks: after their process groups, whose gloo threads exist from
    then on). Returns how many threads were switched."""
    level = RANK_RT_PRIORITY if priority is None else priority
    policy, param = ((os.SCHED_FIFO | os.SCHED_RESET_ON_FORK, os.sched_param(level)) if on
                     else (os.SCHED_OTHER, os.sched_param(0)))
    switched = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setscheduler(int(tid), policy, param)
            switched += 1
        except (ProcessLookupError, PermissionError):
            pass  # a thread that exited meanwhile; or not permitted (checked before)
    return switched


def pin_threads(cpu_slot: int | None) -> int | None:
    """Restrict every thread of this process to the node's CPU number ``cpu_slot`` (an
    index into the CPUs it could use at start; threads started later inherit it from the
    thread that starts them), or with None give them all those CPUs back. Returns the CPU
    id pinned to, or None (also where affinity cannot be set: not Linux)."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cpus = set(_CPUS) if cpu_slot is None else {_CPUS[cpu_slot % len(_CPUS)]}
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except (ProcessLookupError, PermissionError):
            pass  # a thread that exited meanwhile
    return None if cpu_slot is None else next(iter(cpus))


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
