"""tests.support.free_port: the ports the suite's servers are told to bind.

bin/test runs the soak (about 150 new client connections a second) beside the unit and
protocol tests; a port from the kernel's ephemeral range could be taken as some client's
local port between the probe and a server's bind, and that server would not start."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from tests import support
from tests.support import ROOT, free_port


def _ephemeral() -> tuple[int, int]:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        lo, hi = (int(x) for x in f.read().split())
    return lo, hi


def test_ports_are_outside_the_ephemeral_range_bindable_and_never_repeated() -> None:
    lo, hi = _ephemeral()
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert not [p for p in ports if lo <= p <= hi], (lo, hi)
    for p in ports[:20]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))


def test_a_port_in_use_is_skipped() -> None:
    """The next candidates, taken by listeners before free_port reaches them, are passed over
    (the probe's bind fails), not handed out."""
    support.free_port()  # (the candidates are drawn)
    assert support._CANDIDATES is not None
    upcoming = support._CANDIDATES[support._NEXT:support._NEXT + 5]
    held = []
    try:
        for p in upcoming:
            s = socket.socket()
            s.bind(("127.0.0.1", p))
            s.listen()
            held.append(s)
        assert len(upcoming) == 5
        assert not {support.free_port() for _ in range(5)} & set(upcoming)
    finally:
        for s in held:
            s.close()


def _ports_of_lane(lane: int, lanes: int, n: int) -> list[int]:
    code = ("import json; from tests.support import free_port; "
            f"print(json.dumps([free_port() for _ in range({n})]))")
    env = dict(os.environ, PYNGORA_TEST_PORT_LANE=str(lane), PYNGORA_TEST_PORT_LANES=str(lanes))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    return json.loads(out)


def test_two_lanes_never_share_a_port() -> None:
    a, b = _ports_of_lane(0, 2, 300), _ports_of_lane(1, 2, 300)
    assert len(a) == len(b) == 300
    assert not set(a) & set(b)
    assert {p % 2 for p in a} != {p % 2 for p in b}  # the interleaved halves of one span
