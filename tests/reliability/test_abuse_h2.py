"""An HTTP/2 client that never reads, against the real proxy (issue 9's abuse half: "a
client that never reads its response cannot grow the worker's memory without bound").

One connection opens 100 streams (SETTINGS_MAX_CONCURRENT_STREAMS) for endless downloads
and never sends a WINDOW_UPDATE, so nothing past the first 64 KiB can leave the worker.
Each stream's upstream connection stops being read once ``HIGH_WATER`` bytes wait in it, and
the stream's own queue holds about one read more; the rest stays in the kernel's socket
buffers, and the origin blocks. After ``send_timeout_seconds`` every stream is reset and its
upstream connection closed."""
from __future__ import annotations

import asyncio
import socket
import threading
import time

from tests.protocol.test_h2_helpers import H2Client
from tests.reliability.rawnet import RawOrigin, read_request_head, rss_kib
from tests.support import Pyngora, free_port, wait_for

STREAMS = 100
SEND_TIMEOUT = 6  # well past the ~2 s the origins take to block
# Worker RSS growth allowed for the 100 stalled streams: measured 25-29 MiB (~270 KiB a
# stream); it was 47 MiB with the upstream's former 256 KiB high-water mark.
MAX_GROWTH_MIB = 40


def test_h2_client_that_never_reads_a_hundred_downloads(tmp_path) -> None:
    sent: dict[int, int] = {}
    ended: dict[int, str] = {}
    lock = threading.Lock()

    def endless(conn: socket.socket, n: int) -> None:
        buf = b""
        head, buf = read_request_head(conn, buf)
        if not head:
            return
        if not head.startswith(b"GET /big "):
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")  # warm-up
            return
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (1 << 40))
        chunk = b"z" * 65536
        conn.settimeout(60)  # longer than the test: only the proxy ends this
        while True:
            try:
                conn.sendall(chunk)
            except socket.timeout:
                ended[n] = "origin timed out"
                return
            except OSError as e:
                ended[n] = f"closed by the proxy: {e!r}"
                return
            with lock:
                sent[n] = sent.get(n, 0) + len(chunk)

    origin = RawOrigin(endless)
    port = free_port()
    conf = (f"pid_file: {tmp_path}/p.pid\nupgrade_sock: {tmp_path}/u.sock\n"
            f"metrics_dir: {tmp_path}/m\nthreads: 1\nservices:\n  - name: proxy\n"
            f"    type: http_proxy\n"
            f"    listeners: [{{address: '127.0.0.1:{port}', h2c: true}}]\n"
            f"    limits: {{send_timeout_seconds: {SEND_TIMEOUT}}}\n    upstream: big\n"
            f"    upstreams:\n      - name: big\n        backends: [{{addr: '{origin.addr}'}}]\n")
    p = Pyngora(tmp_path, conf).start()

    def total() -> int:
        with lock:
            return sum(sent.values())

    async def main() -> tuple[float, float, int]:
        warm = await H2Client.connect(port)
        r = await asyncio.wait_for(warm.request("GET", "/small"), 20)
        assert dict(r.headers)[b":status"] == b"200"
        await warm.close()
        rss0 = rss_kib(worker)
        c = await H2Client.connect(port, auto_ack=False)
        try:
            sids = [c.start("GET", "/big") for _ in range(STREAMS)]
            # settled: every stream's origin is sending, and the total stopped moving
            deadline = time.monotonic() + 40
            last, peak = -1, rss0
            while True:
                await asyncio.sleep(0.5)
                peak = max(peak, rss_kib(worker))  # (the peak: send_timeout may free it early)
                now = total()
                if now == last and len(sent) == STREAMS:
                    break
                last = now
                assert time.monotonic() < deadline, f"{len(sent)} origins reached, {now} bytes"
            stalled_at = time.monotonic()
            growth = (max(peak, rss_kib(worker)) - rss0) / 1024

            def resets() -> int:
                return sum(1 for sid in sids if c.streams[sid].reset is not None)
            # send_timeout: each stalled stream is reset, its upstream connection closed (the
            # upstream side first: the RST_STREAM is written at the end of that iteration)
            while len(ended) < STREAMS or resets() < STREAMS:
                assert time.monotonic() - stalled_at < SEND_TIMEOUT + 20, (ended, resets())
                await asyncio.sleep(0.1)
            return growth, time.monotonic() - stalled_at, resets()
        finally:
            await c.close()

    try:
        p.wait_serving(port)
        worker = wait_for(lambda: p.workers(), 20, "the worker")[0]  # type: ignore[index]
        growth, gone, resets = asyncio.run(asyncio.wait_for(main(), 90))
        print(f"\nh2 client, {STREAMS} streams never read: the origins sent "
              f"{total() / 2**20:.0f} MiB before back-pressure stopped them; worker RSS "
              f"+{growth:.1f} MiB; all upstream connections closed {gone:.1f} s after that "
              f"(send_timeout {SEND_TIMEOUT} s); {resets} streams reset")
        assert growth < MAX_GROWTH_MIB, growth
        assert all(why.startswith("closed by the proxy") for why in ended.values()), ended
        assert resets == STREAMS
    finally:
        p.stop()
        origin.stop()
