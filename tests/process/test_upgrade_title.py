"""The old master's process title during a zero-downtime upgrade (SPEC sections 3 and 4:
"Its title and pid file show the change"): real processes, a real origin, real sockets."""
from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import Any, Callable

from tests.origins import Origin
from tests.support import Pyngora, alive, free_port, get, title, wait_for

DRAINING = "pyngora: old master (draining)"


class GatedOrigin(Origin):
    """An Origin whose answers wait for ``release``: a request through the proxy stays in
    flight exactly as long as the test wants (no timed "slow" endpoint to guess a length
    for). ``arrived`` is set once a request reached it."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.arrived = threading.Event()
        self.release = threading.Event()

    def _busy(self, conn: socket.socket) -> None:
        super()._busy(conn)
        self.arrived.set()
        self.release.wait(30)  # bounded: a failing test never leaves the thread behind


def _conf(tmp: Path, port: int, origin: int) -> str:
    # grace_period_seconds far above the test's length: the old master may only exit
    # because its in-flight request finished, not because its grace ran out.
    return (f"pid_file: {tmp}/p.pid\nupgrade_sock: {tmp}/u.sock\nerror_log: {tmp}/error.log\n"
            f"metrics_dir: {tmp}/metrics\ngrace_period_seconds: 30\n"
            f"upgrade_timeout_seconds: 10\nthreads: 1\n"
            f"services:\n  - name: gw\n    type: http_proxy\n"
            f"    listeners: ['127.0.0.1:{port}']\n"
            f"    upstreams: [{{name: o, backends: [{{addr: '127.0.0.1:{origin}'}}]}}]\n")


def test_old_master_is_titled_draining_while_an_in_flight_request_finishes(
        tmp_path: Path, pyngora_factory: Callable[..., Pyngora]) -> None:
    """After ``-s upgrade``, the old master, still draining a request that is in flight
    through it, reads ``pyngora: old master (draining)`` in /proc/PID/cmdline (it read
    ``pyngora: master -c FILE`` before); the request then completes with 200 from the old
    side, and the old master exits 0 once it is drained."""
    origin = GatedOrigin("slow").start()
    port = free_port()
    p = pyngora_factory(_conf(tmp_path, port, origin.port)).start()
    try:
        p.wait_serving(port)
        old = p.pid
        assert title(old).startswith(f"pyngora: master -c {p.conf_path}"), title(old)
        result: dict[str, Any] = {}

        def request() -> None:
            try:
                result["r"] = get(port, "/held", timeout=30)
            except Exception as e:  # reset, cut short: the assertion below shows it
                result["r"] = e

        client = threading.Thread(target=request)
        client.start()
        # In flight through the old master's worker, held at the origin.
        assert origin.arrived.wait(10), "the request never reached the origin"
        up = p.run("-s", "upgrade")
        assert up.returncode == 0, up.stdout + up.stderr + p.output()
        new = int((tmp_path / "p.pid").read_text())
        p.extra_pgids.add(os.getpgid(new))  # the new master (-d: its own session) dies too
        assert new != old
        # The title changes once the new master said ready; the held request keeps the old
        # master alive (draining) meanwhile, so it is there to be read.
        try:
            wait_for(lambda: title(old) == DRAINING, 10, "the old master's draining title")
        except AssertionError as e:  # say what it read instead
            raise AssertionError(f"{e}; its title: {title(old)!r}") from None
        assert alive(old) and "r" not in result
        origin.release.set()
        client.join(15)
        assert isinstance(result.get("r"), tuple), result.get("r", "no answer in 15 s")
        status, headers, body = result["r"]
        assert (status, headers.get("x-origin"), body) == (200, "slow", b"slow")
        assert p.wait_exit(15) == 0  # drained: it exits, cleanly
        assert get(port)[0] == 200  # and the new master serves the same port
    finally:
        origin.release.set()
        origin.stop()
