"""What HTTP/2 costs before any proxying: the h2 library's server side, per stream, in-process.

    .venv/bin/python -m tests.bench.h2_floor [--streams N] [--batch N] [--rounds N]

The bench's h2 scenario (h2load -c 10 -m 100 through the proxy to the origin) needs, for
0.5 x nginx, at most twice nginx's CPU per stream. This measures the part of pyngora's cost that
no proxy code can remove: for each stream, the request HEADERS frame received and decoded
(HPACK), the response HEADERS (HPACK-encoded) and one DATA frame with END_STREAM sent, and the
client's WINDOW_UPDATE frames received, with nothing else: no socket, no event loop, no upstream.

Two columns, both with the h2 configuration pyngora uses (``protocols/h2.py``: every optional
validation and normalisation off):

- ``h2``: ``h2.connection.H2Connection`` alone (the library);
- ``H2Server``: pyngora's ``protocols.h2.H2Server`` around it (limits, stream bookkeeping,
  request translation), as the HTTP/2 connection drives it.

The client's frames are produced (untimed) by a second ``H2Connection``, as h2load sends them:
``batch`` requests per read, the same header fields each time (so HPACK indexes them, as with
a real client). Only the server's work is timed (``time.process_time``).
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import h2.config
import h2.connection
import h2.events

from pyngora.protocols import h2 as h2p
from pyngora.protocols.events import MessageEnd

REQUEST = [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http"),
           (b":authority", b"127.0.0.1:8080"), (b"user-agent", b"h2load nghttp2/1.52.0")]
RESPONSE = [(b"server", b"nginx/1.22.1"), (b"date", b"Fri, 27 Nov 2026 10:00:00 GMT"),
            (b"content-type", b"text/plain"), (b"content-length", b"13")]
BODY = b"hello, world\n"


def _client() -> h2.connection.H2Connection:
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                             header_encoding=None))
    c.initiate_connection()
    return c


def _library_server() -> tuple[Callable[[bytes], bytes], h2.connection.H2Connection]:
    """(feed: client bytes -> server bytes, connection) for the h2 library alone."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=False, header_encoding=None, validate_inbound_headers=False,
        normalize_inbound_headers=False, validate_outbound_headers=False,
        normalize_outbound_headers=False))
    conn.initiate_connection()
    status = [(b":status", b"200")] + RESPONSE

    def feed(data: bytes) -> bytes:
        for ev in conn.receive_data(data):
            if ev.__class__ is h2.events.RequestReceived:
                conn.send_headers(ev.stream_id, status)
                conn.send_data(ev.stream_id, BODY, end_stream=True)
        return conn.data_to_send()
    return feed, conn


def _pyngora_server() -> tuple[Callable[[bytes], bytes], h2p.H2Server]:
    """(feed, server) for pyngora's H2Server, answering each request as the app would."""
    srv = h2p.H2Server()
    srv.initiate()

    def feed(data: bytes) -> bytes:
        for ev in srv.feed(data):
            if ev.__class__ is MessageEnd:
                sid = ev.stream_id
                srv.send_head(sid, 200, RESPONSE)
                srv.send_body(sid, BODY, end=True)
                srv.release(sid)
        return srv.data_to_send()
    return feed, srv


def per_stream_us(make: Callable[[], tuple[Callable[[bytes], bytes], object]], streams: int,
                  batch: int) -> float:
    """CPU microseconds per stream of ``make``'s server over ``streams`` streams."""
    feed, _ = make()
    client = _client()
    for ev in client.receive_data(feed(client.data_to_send())):
        pass
    feed(client.data_to_send())  # the client's SETTINGS ACK
    spent = 0.0
    done = 0
    while done < streams:
        for _ in range(batch):
            client.send_headers(client.get_next_available_stream_id(), REQUEST, end_stream=True)
        data = client.data_to_send()
        t0 = time.process_time()
        out = feed(data)
        spent += time.process_time() - t0
        for ev in client.receive_data(out):
            if ev.__class__ is h2.events.DataReceived:
                client.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        done += batch
    return spent / done * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=20000)
    ap.add_argument("--batch", type=int, default=50, help="requests per read (<= 100)")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args(argv)
    rows = {"h2": _library_server, "H2Server": _pyngora_server}
    results: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(a.rounds):
        for name, make in rows.items():
            results[name].append(per_stream_us(make, a.streams, a.batch))
    for name, xs in results.items():
        print(f"{name:9s} {statistics.median(xs):6.1f} us CPU per stream "
              f"(median of {a.rounds}: {', '.join(f'{x:.1f}' for x in xs)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
