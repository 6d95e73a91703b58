"""The congestion control of the ranks' gloo sockets (runtime.sockets)."""

import socket
import sys
from pathlib import Path

import pytest

from emulator.runtime.sockets import (congestion_controls, congestion_of, set_congestion,
                                      socket_fds, wants_congestion)

DEFAULT = Path("/proc/sys/net/ipv4/tcp_congestion_control")
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="per-socket congestion control is Linux's")


def test_wants_congestion_by_mode_and_backend():
    assert wants_congestion("auto", "gloo", {"reno", "cubic", "bbr"}) == "cubic"
    assert wants_congestion("auto", "nccl", {"cubic"}) is None
    assert wants_congestion("auto", "gloo", {"reno", "bbr"}) is None  # cannot: left alone
    assert wants_congestion("system", "gloo", {"cubic"}) is None
    assert wants_congestion("cubic", "nccl", {"cubic"}) == "cubic"
    with pytest.raises(ValueError, match="tcp congestion cubic cannot be set here"):
        wants_congestion("cubic", "gloo", {"reno"})
    with pytest.raises(ValueError, match="must be one of auto, cubic, system, got 'bbr'"):
        wants_congestion("bbr", "gloo", {"bbr"})


@linux_only
def test_set_congestion_switches_new_tcp_sockets_only():
    if "reno" not in congestion_controls():
        pytest.skip("reno cannot be set here")
    before = socket_fds()
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    peer, _ = server.accept()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client_fd = client.fileno()
    try:
        new = socket_fds() - before
        assert {server.fileno(), client.fileno(), peer.fileno(), udp.fileno()} <= new
        report = set_congestion(new, "reno")
        assert report["sockets"] == 3  # the UDP socket is skipped
        # new sockets had the host's default
        assert report["was"] == [DEFAULT.read_text().strip()]
        assert congestion_of(new) == ["reno"]
        for s in (server, client, peer):
            got = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16)
            assert got.split(b"\0", 1)[0] == b"reno"
        client.sendall(b"x" * 1000)  # the sockets still work and are still open
        assert len(peer.recv(2000)) > 0
    finally:
        for s in (server, client, peer, udp):
            s.close()
    assert set_congestion({client_fd}, "reno")["sockets"] == 0  # closed since: skipped
