"""GOAWAY during a zero-downtime upgrade (issue 6, "GOAWAY observed by the client during an
upgrade; no stream lost"), with a real pyngora (``python -m pyngora -c FILE -d``, then
``-s upgrade``) and an HTTP/2 client built on the h2 library.

Two tests: one stream held in flight across an upgrade (below), and HTTP/2 proxying under
load across two upgrades (``test_h2_proxy_load_across_upgrades_loses_no_stream``).

The client holds a stream in flight across the upgrade: a 1 MiB response that it does not
acknowledge, so the old worker cannot finish sending it (flow control) until the client
says so. The old master hands its socket over and drains: the client sees GOAWAY with a last
stream id that covers its stream, then acknowledges, and the whole body arrives. A new
connection is then served by the new master. No stream is lost."""
from __future__ import annotations

import asyncio
import time
from typing import Optional

import h2.events
import pytest

from pyngora.protocols.h2_frames import REFUSED_STREAM
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


# --- HTTP/2 through the proxy, under load, across upgrades --------------------------------

LOAD_CONNECTIONS = 6
LOAD_STREAMS = 20  # in flight per connection, as h2load -m keeps them
NO_LAST_ID = 2 ** 31 - 1  # the graceful GOAWAY's "no limit yet" (RFC 9113 section 6.8)


def _proxy_conf(tmp, origin: int, port: int) -> str:
    return (f"pid_file: {tmp}/p.pid\nupgrade_sock: {tmp}/u.sock\nerror_log: {tmp}/error.log\n"
            f"grace_period_seconds: 20\nupgrade_timeout_seconds: 10\n"
            f"metrics_dir: {tmp}/metrics\nthreads: 2\naccess_log: 'off'\n"
            f"services:\n  - name: origin\n    type: static\n"
            f"    listeners: ['127.0.0.1:{origin}']\n    body: hello\n"
            f"  - name: proxy\n    type: http_proxy\n"
            f"    listeners: [{{address: '127.0.0.1:{port}', h2c: true}}]\n"
            f"    upstreams:\n      - name: origin\n"
            f"        backends: [{{addr: '127.0.0.1:{origin}'}}]\n")


class _LoadClient(H2Client):
    """H2Client that queues each stream's end (or reset), and None for a GOAWAY."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.ends: asyncio.Queue[Optional[int]] = asyncio.Queue()

    def _event(self, ev: object) -> None:
        super()._event(ev)
        if isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
            self.ends.put_nowait(ev.stream_id)
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.ends.put_nowait(None)


class _Tally:
    def __init__(self) -> None:
        self.ok = 0
        self.goaways = 0
        self.connections = 0
        self.refused: list[str] = []  # streams a GOAWAY or REFUSED_STREAM turned away
        self.failed: list[str] = []  # streams lost: reset, not 200, or cut off


async def _client(port: int, stop: asyncio.Event, tally: _Tally) -> None:
    """One client as RFC 9113 section 6.8 has it: keeps LOAD_STREAMS streams in flight on a
    connection until a GOAWAY, then opens no new stream there, lets the ones in flight end,
    and goes on with a new connection."""
    while not stop.is_set():
        c = await _LoadClient.connect(port)
        tally.connections += 1
        inflight: set[int] = set()
        try:
            while True:
                while (len(inflight) < LOAD_STREAMS and not c.goaways and not stop.is_set()
                       and not c.closed.is_set()):
                    inflight.add(c.start("GET", "/"))
                if not inflight:
                    break
                try:
                    sid = await asyncio.wait_for(c.ends.get(), 0.5)
                except asyncio.TimeoutError:
                    sid = None
                if sid is None and c.goaways:
                    last = c.goaways[-1].last_stream_id
                    for turned in [x for x in inflight if x > last]:
                        inflight.discard(turned)
                        tally.refused.append(f"stream {turned} above GOAWAY's last id {last}")
                if sid in inflight:
                    inflight.discard(sid)
                    s = c.streams[sid]
                    status = dict(s.headers).get(b":status")
                    if s.ended and s.reset is None and status == b"200" and s.body == b"hello":
                        tally.ok += 1
                    elif s.reset == REFUSED_STREAM:
                        tally.refused.append(f"stream {sid} REFUSED_STREAM")
                    else:
                        tally.failed.append(f"stream {sid}: status {status!r}, reset "
                                            f"{s.reset}, body {bytes(s.body[:40])!r}")
                if c.closed.is_set() and c.ends.empty():
                    for lost in inflight:
                        tally.failed.append(f"stream {lost}: connection closed before its end")
                    break
        finally:
            tally.goaways += len(c.goaways)
            await c.close()


def test_h2_proxy_load_across_upgrades_loses_no_stream(tmp_path, daemon) -> None:
    """HTTP/2 clients keep 120 streams in flight through the proxy while the master is
    upgraded twice: every stream gets its 200, none is refused (the graceful GOAWAY of
    2^31-1 and a PING come first, so the final GOAWAY covers every stream the client sent
    before it stopped), and the old masters exit."""
    origin, port = free_port(), free_port()
    d = daemon(_proxy_conf(tmp_path, origin, port))
    r = d.cmd("-d")
    assert r.returncode == 0, r.stderr + d.log()
    pids = [d.pid()]
    tally = _Tally()

    async def until_ok(n: int) -> None:
        target = tally.ok + n
        deadline = time.monotonic() + 30
        while tally.ok < target:
            assert time.monotonic() < deadline, f"load stalled: {tally.ok} ok, {tally.failed[:5]}"
            await asyncio.sleep(0.05)

    async def main() -> None:
        stop = asyncio.Event()
        clients = [asyncio.ensure_future(_client(port, stop, tally))
                   for _ in range(LOAD_CONNECTIONS)]
        try:
            await until_ok(500)
            loop = asyncio.get_running_loop()
            for _ in range(2):
                res = await loop.run_in_executor(None, d.cmd, "-s", "upgrade")
                assert res.returncode == 0, res.stderr + d.log()
                pids.append(d.pid())
                await until_ok(500)  # the new master serves, through new connections
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*clients), 60)

    asyncio.run(asyncio.wait_for(main(), 120))
    print(f"\nh2 through the proxy across 2 upgrades: {tally.ok} ok, {len(tally.failed)} "
          f"failed, {len(tally.refused)} refused, {tally.goaways} GOAWAYs on "
          f"{tally.connections} connections")
    assert tally.failed == []
    assert tally.refused == []
    # the drain was exercised: the old masters' connections said GOAWAY and were replaced
    assert tally.goaways >= LOAD_CONNECTIONS and tally.connections > LOAD_CONNECTIONS
    assert len(set(pids)) == 3
    for old in pids[:-1]:
        wait_for(lambda: not alive(old), 30, "the old master to drain and exit")
