"""GOAWAY during a zero-downtime upgrade (issue 6, "GOAWAY observed by the client during an
upgrade; no stream lost"), with a real pyngora (``python -m pyngora -c FILE -d``, then
``-s upgrade``) and an HTTP/2 client built on the h2 library.

The client holds a stream in flight across the upgrade: a 1 MiB response that it does not
acknowledge, so the old worker cannot finish sending it (flow control) until the client
says so. The old master hands its socket over and drains: the client sees GOAWAY with a last
stream id that covers its stream, then acknowledges, and the whole body arrives. A new
connection is then served by the new master. No stream is lost."""
from __future__ import annotations

import asyncio

import pytest

from tests.process.test_upgrade import Daemon
from tests.protocol.test_h2_helpers import H2Client
from tests.support import alive, free_port, wait_for

BODY_SIZE = 1024 * 1024


def _conf(tmp, port: int) -> str:
    return (f"pid_file: {tmp}/p.pid\nupgrade_sock: {tmp}/u.sock\nerror_log: {tmp}/error.log\n"
            f"grace_period_seconds: 20\nupgrade_timeout_seconds: 10\n"
            f"metrics_dir: {tmp}/metrics\nthreads: 1\n"
            f"services:\n  - name: origin\n    type: static\n"
            f"    listeners: [{{address: '127.0.0.1:{port}', h2c: true}}]\n"
            f"    body: {'x' * BODY_SIZE}\n")


@pytest.fixture
def daemon(tmp_path):
    made: list[Daemon] = []
    yield lambda text: made.append(Daemon(tmp_path, text)) or made[-1]
    for d in made:
        d.kill()


def test_goaway_during_upgrade_loses_no_stream(tmp_path, daemon) -> None:
    port = free_port()
    d = daemon(_conf(tmp_path, port))
    r = d.cmd("-d")
    assert r.returncode == 0, r.stderr + d.log()
    old = d.pid()

    async def main() -> None:
        c = await H2Client.connect(port, auto_ack=False)
        try:
            sid = c.start("GET", "/in-flight")
            s = c.streams[sid]
            # the first 64 KiB (the initial window) arrive; the rest waits for our ACK
            await asyncio.wait_for(s.received.wait(), 10)
            assert s.headers and s.status == 200 and not s.ended
            loop = asyncio.get_running_loop()
            upgrade = loop.run_in_executor(None, d.cmd, "-s", "upgrade")
            await asyncio.wait_for(c.goaway_event.wait(), 30)
            # the GOAWAY covers the stream in flight: it will finish, not be refused
            assert all(g.last_stream_id >= sid for g in c.goaways)
            assert all(int(g.error_code) == 0 for g in c.goaways)
            assert not s.ended and s.reset is None
            c.auto_ack = True
            c.conn.acknowledge_received_data(len(s.body), sid)
            c.flush()
            await asyncio.wait_for(s.done.wait(), 30)
            assert s.ended and s.reset is None and len(s.body) == BODY_SIZE
            res = await asyncio.wait_for(upgrade, 60)
            assert res.returncode == 0, res.stderr + d.log()
        finally:
            await c.close()
        # a new connection: the new master answers
        c2 = await H2Client.connect(port)
        try:
            r2 = await asyncio.wait_for(c2.request("GET", "/after"), 20)
            assert r2.status == 200 and len(r2.body) == BODY_SIZE
        finally:
            await c2.close()

    asyncio.run(asyncio.wait_for(main(), 90))
    new = d.pid()
    assert new != old
    wait_for(lambda: not alive(old), 30, "the old master to drain and exit")
