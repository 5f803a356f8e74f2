"""``limits.h2_max_concurrent_streams`` from the YAML file to the wire, with a real pyngora:
the client is told the limit in SETTINGS, and a stream past it is refused (REFUSED_STREAM,
safe to retry) while the others stay served."""
from __future__ import annotations

import asyncio

from pyngora.protocols.h2_frames import REFUSED_STREAM
from tests.protocol.test_h2_helpers import H2Client
from tests.support import Pyngora, free_port

BODY = 256 * 1024  # over the 64 KiB stream window: a stream stays open until the client reads


def test_h2_max_concurrent_streams_from_yaml(tmp_path) -> None:
    port = free_port()
    conf = (f"pid_file: {tmp_path}/p.pid\nupgrade_sock: {tmp_path}/u.sock\n"
            f"metrics_dir: {tmp_path}/m\nthreads: 1\nservices:\n  - name: origin\n"
            f"    type: static\n    listeners: [{{address: '127.0.0.1:{port}', h2c: true}}]\n"
            f"    limits: {{h2_max_concurrent_streams: 3}}\n    body: {'x' * BODY}\n")
    p = Pyngora(tmp_path, conf).start()

    async def main() -> None:
        c = await H2Client.connect(port, auto_ack=False)
        try:
            c.conn.increment_flow_control_window(BODY * 4)  # only stream windows hold them
            # Four at once, before the client library has read the server's SETTINGS (it
            # would not open a fourth after): the server refuses the one past its limit.
            sids = [c.start("GET", f"/{i}") for i in range(4)]
            first, extra = sids[:3], sids[3]
            for sid in first:  # each got its stream window's worth, and waits for more
                await asyncio.wait_for(c.streams[sid].received.wait(), 10)
            s = await c.wait(extra, 10)
            assert s.reset == REFUSED_STREAM and not s.headers
            assert c.conn.remote_settings.max_concurrent_streams == 3
            assert all(c.streams[sid].reset is None for sid in first)
            c.auto_ack = True  # read on: the three held streams finish whole
            for sid in first:
                got = len(c.streams[sid].body)
                c.conn.acknowledge_received_data(got, sid)
                c.conn.increment_flow_control_window(got)
            c.flush()
            for sid in first:
                s = await c.wait(sid, 20)
                assert s.ended and s.reset is None and len(s.body) == BODY
        finally:
            await c.close()

    try:
        p.wait_serving(port)
        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        p.stop()
