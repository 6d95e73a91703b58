"""Idle-priority spinners: how they are shared out, their scheduling class, and that they
exit with their parent; real-time priority; ranks pinned to CPUs."""

import os
import subprocess
import sys
import time

import pytest

from emulator.runtime.awake import IdleSpinners, spinners_for, wants_keep_awake
from emulator.runtime.delay import SPIN_S, spin_for


def test_spinners_are_shared_out_one_per_cpu():
    assert [spinners_for(i, 2, 2) for i in range(2)] == [1, 1]
    assert [spinners_for(i, 3, 8) for i in range(3)] == [3, 3, 2]
    assert [spinners_for(i, 4, 2) for i in range(4)] == [1, 1, 0, 0]
    with pytest.raises(ValueError):
        spinners_for(2, 2, 4)
    assert wants_keep_awake("auto", "gloo") and not wants_keep_awake("auto", "nccl")
    assert wants_keep_awake("on", "nccl") and not wants_keep_awake("off", "gloo")
    with pytest.raises(ValueError, match="auto, on or off"):
        wants_keep_awake("yes", "gloo")


def test_auto_delay_mode_sleeps_when_kept_awake():
    assert spin_for("auto", 2, 2, keep_awake=True) == SPIN_S
    assert spin_for("auto", 2, 2) == float("inf")
    assert spin_for("auto", 4, 2) == SPIN_S
    assert spin_for("spin", 2, 2, keep_awake=True) == float("inf")


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux-only")
def test_spinners_run_at_idle_priority_and_stop():
    spinners = IdleSpinners()
    assert spinners.start(2) == 2
    try:
        pids = [p.pid for p in spinners._procs]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(
                os.sched_getscheduler(pid) != os.SCHED_IDLE for pid in pids):
            time.sleep(0.05)  # the child sets its own class right after starting
        assert [os.sched_getscheduler(pid) for pid in pids] == [os.SCHED_IDLE] * 2
        assert spinners.count == 2
    finally:
        spinners.stop()
    assert spinners.count == 0


def test_spinner_exits_when_its_parent_dies():
    code = ("import sys; from emulator.runtime.awake import IdleSpinners; s = IdleSpinners(); "
            "s.start(1); print(s._procs[0].pid, flush=True)")  # parent exits without stop()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30, check=True)
    pid = int(out.stdout.strip())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    pytest.fail(f"spinner {pid} outlived its parent")


def test_realtime_only_with_slept_delays_and_permission():
    from emulator.runtime.awake import wants_realtime

    assert wants_realtime("auto", "gloo", sleeps=True, allowed=True)
    assert not wants_realtime("auto", "nccl", sleeps=True, allowed=True)
    assert not wants_realtime("auto", "gloo", sleeps=False, allowed=True)
    assert not wants_realtime("auto", "gloo", sleeps=True, allowed=False)
    assert not wants_realtime("normal", "gloo", sleeps=True, allowed=True)
    assert wants_realtime("realtime", "nccl", sleeps=True, allowed=True)
    with pytest.raises(ValueError, match="needs slept delays"):
        wants_realtime("realtime", "gloo", sleeps=False, allowed=True)
    with pytest.raises(ValueError, match="not permitted"):
        wants_realtime("realtime", "gloo", sleeps=True, allowed=False)
    with pytest.raises(ValueError, match="auto, realtime or normal"):
        wants_realtime("high", "gloo", sleeps=True, allowed=True)


def test_config_refuses_realtime_with_spun_delays(tmp_path):
    from emulator.config import RunConfig

    with pytest.raises(ValueError, match="rank_priority=realtime needs slept delays"):
        RunConfig(trace=tmp_path / "t.arrow", model="tiny", rank_priority="realtime",
                  delay_mode="spin")


def test_set_realtime_switches_every_thread_and_children_start_normal():
    import threading

    from emulator.runtime.awake import (DRIVER_RT_PRIORITY, RANK_RT_PRIORITY,
                                        realtime_allowed, set_realtime)

    if not realtime_allowed():
        pytest.skip("SCHED_FIFO is not permitted here")
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    policy = lambda tid: os.sched_getscheduler(tid) & ~os.SCHED_RESET_ON_FORK  # noqa: E731
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
        assert set_realtime(True) >= 2
        assert {policy(t) for t in tids} == {os.SCHED_FIFO}
        # the ranks' level, one above a real-time driver's
        assert {os.sched_getparam(t).sched_priority for t in tids} == {RANK_RT_PRIORITY}
        assert RANK_RT_PRIORITY == DRIVER_RT_PRIORITY + 1
        child = subprocess.run([sys.executable, "-c", "import os; print(os.sched_getscheduler(0))"],
                               capture_output=True, text=True, timeout=30, check=True)
        assert int(child.stdout) == os.SCHED_OTHER  # reset on fork
        later: list[int] = []  # and so are threads started afterwards (the docstring says so)
        t = threading.Thread(target=lambda: later.append(policy(0)))
        t.start()
        t.join()
        assert later == [os.SCHED_OTHER]
    finally:
        set_realtime(False)
        stop.set()
        other.join()
    assert {policy(t) for t in tids if os.path.exists(f"/proc/self/task/{t}")} == {
        os.SCHED_OTHER}


def test_driver_realtime_follows_the_ranks_on_its_host_and_permission():
    from emulator.runtime.awake import wants_driver_realtime

    assert wants_driver_realtime("auto", ranks_realtime_here=True, allowed=True)
    assert not wants_driver_realtime("auto", ranks_realtime_here=False, allowed=True)
    assert not wants_driver_realtime("auto", ranks_realtime_here=True, allowed=False)
    assert not wants_driver_realtime("normal", ranks_realtime_here=True, allowed=True)
    assert wants_driver_realtime("realtime", ranks_realtime_here=False, allowed=True)
    from emulator.errors import ConfigError

    with pytest.raises(ConfigError, match="driver priority realtime is not permitted"):
        wants_driver_realtime("realtime", ranks_realtime_here=True, allowed=False)
    with pytest.raises(ValueError, match="auto, realtime or normal"):
        wants_driver_realtime("high", ranks_realtime_here=True, allowed=True)


def test_driver_priority_is_counted_and_leaves_a_realtime_process_alone(monkeypatch):
    from emulator.runtime import awake
    from emulator.runtime.awake import DriverPriority

    calls = []
    monkeypatch.setattr(awake, "set_realtime",
                        lambda on, priority=None: calls.append((on, priority)) or 1)
    monkeypatch.setattr(awake.os, "sched_getscheduler", lambda pid: awake.os.SCHED_OTHER)
    DriverPriority.hold()
    DriverPriority.hold()  # a probe's group inside a run's
    DriverPriority.release()
    assert calls == [(True, 1)] and DriverPriority.holds() == 1
    DriverPriority.release()
    assert calls == [(True, 1), (False, None)] and DriverPriority.holds() == 0
    with pytest.raises(RuntimeError, match="without a hold"):
        DriverPriority.release()
    # started under chrt -f: neither raised nor lowered
    monkeypatch.setattr(awake.os, "sched_getscheduler",
                        lambda pid: awake.os.SCHED_FIFO | awake.os.SCHED_RESET_ON_FORK)
    DriverPriority.hold()
    DriverPriority.release()
    assert calls == [(True, 1), (False, None)]


def test_worker_group_teardown_releases_the_driver(monkeypatch):
    from emulator.runtime import awake
    from emulator.runtime.awake import DriverPriority
    from emulator.runtime.cluster import WorkerGroup

    calls = []
    monkeypatch.setattr(awake, "set_realtime",
                        lambda on, priority=None: calls.append((on, priority)) or 1)
    monkeypatch.setattr(awake.os, "sched_getscheduler", lambda pid: awake.os.SCHED_OTHER)
    group = WorkerGroup.__new__(WorkerGroup)  # no actors: only the driver's priority
    group.actors, group._placement, group._open = [], None, []
    group.driver_realtime = True
    DriverPriority.hold()
    group.teardown()
    assert calls == [(True, 1), (False, None)] and DriverPriority.holds() == 0
    assert not group.driver_realtime
    group.teardown()  # twice: nothing left to release
    assert DriverPriority.holds() == 0


def test_decide_combines_spinners_delays_and_priority():
    from emulator.runtime.awake import HostMode, decide, realtime_allowed
    from emulator.runtime.delay import REALTIME_SPIN_S

    rt = realtime_allowed()
    auto = decide(HostMode(), "gloo", 2, 2)
    assert (auto.keep_awake, auto.realtime) == (True, rt)
    assert auto.spin_s == (REALTIME_SPIN_S if rt else SPIN_S)
    # no spinners and a core per rank: delays spun whole, so never real-time
    assert decide(HostMode(keep_awake="off"), "gloo", 2, 2) == (
        type(auto)(keep_awake=False, spin_s=float("inf"), realtime=False, cpu_slot=None))
    assert decide(HostMode(rank_priority="normal"), "gloo", 2, 2).spin_s == SPIN_S
    assert not decide(HostMode(), "nccl", 1, 8).realtime
    with pytest.raises(ValueError, match="needs slept delays"):
        decide(HostMode(delay_mode="spin", rank_priority="realtime"), "gloo", 2, 2)


def test_pin_threads_pins_every_thread_and_gives_the_cpus_back():
    import threading

    from emulator.runtime.awake import cpus_available, pin_threads

    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no CPU affinity here")
    full = os.sched_getaffinity(0)
    last = sorted(full)[-1]
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
        assert pin_threads(len(full) - 1) == last
        assert {frozenset(os.sched_getaffinity(t)) for t in tids} == {frozenset({last})}
        assert cpus_available() == len(full)  # still the node's CPUs, not the pinned one
        assert pin_threads(len(full)) == sorted(full)[0]  # slots wrap round
    finally:
        assert pin_threads(None) is None
        stop.set()
        other.join()
    assert os.sched_getaffinity(0) == full


def test_ranks_are_pinned_round_robin_where_each_has_a_cpu():
    from emulator.runtime.awake import HostMode, decide, wants_pinned

    # auto: a CPU per rank and one for the driver and Ray's daemons
    assert wants_pinned("auto", "gloo", 2, 3) and not wants_pinned("auto", "gloo", 2, 2)
    assert not wants_pinned("auto", "nccl", 1, 8) and wants_pinned("on", "gloo", 4, 2)
    assert not wants_pinned("off", "gloo", 1, 2)
    with pytest.raises(ValueError, match="auto, on or off"):
        wants_pinned("yes", "gloo", 1, 2)
    assert [decide(HostMode(), "gloo", 2, 4, i).cpu_slot for i in range(2)] == [0, 1]
    assert [decide(HostMode(), "gloo", 2, 2, i).cpu_slot for i in range(2)] == [None] * 2
    assert [decide(HostMode(pin_ranks="on"), "gloo", 4, 2, i).cpu_slot
            for i in range(4)] == [0, 1, 0, 1]
    assert decide(HostMode(pin_ranks="off"), "gloo", 2, 2, 1).cpu_slot is None
