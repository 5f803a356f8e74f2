"""SIGTERM's deadline (SPEC section 3): a graceful stop waits for in-flight requests at most
``grace_period_seconds``, then gives stragglers ``graceful_shutdown_timeout_seconds`` more
before SIGKILL. Real processes: a proxy whose origin never answers (its request cannot
finish), and a background service that blocks in ``time.sleep`` (it cannot hear the stop)."""
from __future__ import annotations

import signal
import socket
import threading
import time

from tests.support import alive, children_of, free_port, get, title, wait_for

BLOCKING = '''
import time

class Deaf:
    """Blocks the loop: the stop it is asked for never reaches it."""
    async def start(self, shutdown):
        time.sleep(3600)
'''


def test_sigterm_cuts_stragglers_at_the_grace_period_and_kills_after_the_timeout(
        tmp_path, pyngora_factory) -> None:
    origin = socket.socket()
    origin.bind(("127.0.0.1", 0))
    origin.listen(16)
    got: list[socket.socket] = []
    request_seen = threading.Event()

    def accept() -> None:  # reads the request, never answers
        try:
            conn, _ = origin.accept()
        except OSError:
            return
        got.append(conn)
        conn.recv(65536)
        request_seen.set()
    threading.Thread(target=accept, daemon=True).start()
    (tmp_path / "deafapp.py").write_text(BLOCKING)
    port = free_port()
    p = pyngora_factory(
        f"pid_file: {tmp_path}/p.pid\nupgrade_sock: {tmp_path}/u.sock\n"
        f"error_log: {tmp_path}/e.log\nmetrics_dir: {tmp_path}/m\n"
        f"grace_period_seconds: 1\ngraceful_shutdown_timeout_seconds: 1\n"
        f"services:\n  - {{name: deaf, type: background, app: 'deafapp:Deaf'}}\n"
        f"  - name: proxy\n    type: http_proxy\n    listeners: ['127.0.0.1:{port}']\n"
        f"    upstreams: [{{name: o, backends: [{{addr: '127.0.0.1:{origin.getsockname()[1]}'}}],"
        f" timeouts: {{read_seconds: 120}}}}]\n").start()
    try:
        p.wait_serving(port)
        (deaf,) = wait_for(lambda: [c for c in children_of(p.pid)
                                    if title(c) == "pyngora: background deaf"], 10, "deaf")
        cut: dict = {}

        def client() -> None:
            try:
                cut["result"] = get(port, "/", timeout=60)
            except Exception as e:  # EOF or reset when the grace period ends
                cut["result"] = e
            cut["at"] = time.monotonic()
        t = threading.Thread(target=client)
        t.start()
        assert request_seen.wait(10), "the request never reached the origin"
        stopped = time.monotonic()
        p.signal(signal.SIGTERM)
        assert p.wait_exit(20) == 0  # the default grace (300 s) would hold it for minutes
        exited = time.monotonic() - stopped
        t.join(10)
        waited = cut["at"] - stopped
        # The request was given its grace period, not cut at once, and not much more.
        assert 0.9 <= waited <= 8, (waited, cut["result"])
        assert not isinstance(cut["result"], tuple) or cut["result"][0] >= 500, cut["result"]
        # The background process could not hear the stop: killed after grace + timeout.
        assert 1.9 <= exited <= 15, exited
        assert not alive(deaf)
        assert "still running after the shutdown timeout" in (tmp_path / "e.log").read_text()
    finally:
        origin.close()
        for c in got:
            c.close()
