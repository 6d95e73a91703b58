"""The TCP congestion control of the sockets gloo opens between a worker's ranks.

Linux gives every new TCP socket the host's default congestion control
(``net.ipv4.tcp_congestion_control``). Where that is BBR, the kernel paces a socket's
segments at the bandwidth BBR estimates from how fast its recent data was acknowledged. An
emulation's connections carry sparse bursts: a pipeline transfer every stage, a TP
all-reduce after every compute delay, each acknowledged only when the peer's thread wakes.
BBR's estimate then follows the run's history, not the link: on the 2-vCPU development VM
(loopback MSS 65,483 bytes), during a PP=2 llama-3.1-8b run at dilation 50, ``ss -ti`` on
the pipeline's socket showed BBR's bandwidth at 0-4.4 GB/s and a smoothed RTT of 8-20 ms,
against 16 GB/s and ~0.05 ms on the host probe's socket, whose plans came faster. The
run's 128 KiB transfers (three segments) then took ~50-70 us more than its smaller ones
(two segments or fewer), which the probe did not see; with cubic (unpaced) they took the
same (docs/results-validation.md, repeat 18). So by default the emulator switches the
sockets its gloo groups opened to cubic (:func:`wants_congestion`), and the time of a
collective depends on its size and the host's wake-ups, not on what the socket carried
before. It applies to the emulator's own sockets only; the host's default is left alone.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

PROC_FD = Path("/proc/self/fd")
ALLOWED = Path("/proc/sys/net/ipv4/tcp_allowed_congestion_control")
AVAILABLE = Path("/proc/sys/net/ipv4/tcp_available_congestion_control")
DEFAULT_CONGESTION = "cubic"
MODES = ("auto", "cubic", "system")


def socket_fds() -> set[int]:
    """File descriptors of this process that are sockets (empty where /proc is missing)."""
    try:
        names = os.listdir(PROC_FD)
    except OSError:
        return set()
    fds = set()
    for name in names:
        try:
            if os.readlink(PROC_FD / name).startswith("socket:"):
                fds.add(int(name))
        except (OSError, ValueError):
            continue  # closed since listed
    return fds


def congestion_controls() -> set[str]:
    """The congestion controls this process may set on a socket: every loaded one for
    root, else the allowed list (empty where the kernel does not say)."""
    path = AVAILABLE if os.geteuid() == 0 else ALLOWED
    try:
        return set(path.read_text().split())
    except OSError:
        return set()


def wants_congestion(mode: str, backend: str, controls: set[str] | None = None) -> str | None:
    """The congestion control to set on a rank's gloo sockets: ``cubic``; ``system``: none
    (the host's default stays); ``auto``: cubic with the gloo backend when this process may
    set it, else none. Raises ValueError for an unknown mode, or for ``cubic`` where it
    cannot be set."""
    if mode not in MODES:
        raise ValueError(f"tcp congestion must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "system":
        return None
    usable = DEFAULT_CONGESTION in (congestion_controls() if controls is None else controls)
    if mode == DEFAULT_CONGESTION:
        if not usable:
            raise ValueError(f"tcp congestion {mode} cannot be set here (not in "
                             f"{ALLOWED}); use auto or system")
        return mode
    return DEFAULT_CONGESTION if backend == "gloo" and usable else None


def _tcp_sockets(fds: set[int]):
    """Each TCP socket among ``fds`` as a socket object borrowing its fd (detached again
    after the caller's step; fds that are not TCP sockets or were closed are skipped)."""
    for fd in sorted(fds):
        try:
            sock = socket.socket(fileno=fd)
        except (OSError, ValueError):
            continue
        try:
            if sock.type == socket.SOCK_STREAM and sock.family in (socket.AF_INET,
                                                                   socket.AF_INET6):
                yield sock
        finally:
            sock.detach()  # the fd stays its owner's


def _congestion(sock: socket.socket) -> str:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).split(
        b"\0", 1)[0].decode()


def congestion_of(fds: set[int]) -> list[str]:
    """The congestion controls of the TCP sockets among ``fds``, sorted, without repeats."""
    names = set()
    for sock in _tcp_sockets(fds):
        try:
            names.add(_congestion(sock))
        except OSError:
            continue
    return sorted(names)


def set_congestion(fds: set[int], name: str) -> dict:
    """Set congestion control ``name`` on every TCP socket among ``fds`` (others, and fds
    closed since, are skipped); returns ``{"sockets": how many were set, "was": the
    controls they had}``."""
    done, was = 0, set()
    for sock in _tcp_sockets(fds):
        try:
            was.add(_congestion(sock))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, name.encode())
            done += 1
        except OSError:
            continue
    return {"sockets": done, "was": sorted(was)}
