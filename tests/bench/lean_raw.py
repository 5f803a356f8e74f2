"""A lean proxy without per-field callbacks: the second experiment beside tests/bench/lean.py.

    python -m tests.bench.lean_raw STATIC_PORT PROXY_PORT ORIGIN_PORT BODY    (as floor.py)

As lean.py (pooled upstream connections, both directions parsed by llhttp, hop-by-hop fields
dropped), but the heads are never split into fields: llhttp runs with one callback
(``on_message_complete``) and the hop-by-hop lines are cut from the raw bytes. Assumes what
wrk does (one request per read, no pipelining): an experiment, not a proxy.

``LEAN=nostrip`` in the environment skips the hop-by-hop cut (both directions): what the cut
itself costs.
"""
from __future__ import annotations

import asyncio
import os

import httptools

from tests.bench.lean import PooledUp, forward, serve

POOL: list = []
NOSTRIP = "nostrip" in os.environ.get("LEAN", "")
HOPS = (b"\r\nconnection:", b"\r\nkeep-alive:", b"\r\nproxy-connection:", b"\r\nte:",
        b"\r\ntrailer:", b"\r\ntransfer-encoding:", b"\r\nupgrade:")


def strip_hop(head: bytes) -> bytes:
    low = head.lower()
    for h in HOPS:
        if h in low:
            break
    else:
        return head
    lines = head.split(b"\r\n")
    keep = [lines[0]]
    for line in lines[1:]:
        name = line.partition(b":")[0].lower()
        if b"\r\n" + name + b":" not in HOPS:
            keep.append(line)
    return b"\r\n".join(keep)


class Up(PooledUp):
    pool = POOL

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.down = None
        self.transport = None
        self.head = True

    def data_received(self, data: bytes) -> None:
        down = self.down
        if self.head and not NOSTRIP:
            self.head = False
            i = data.find(b"\r\n\r\n")
            data = strip_hop(data[:i]) + data[i:]
        self.parser.feed_data(data)
        down.transport.write(data)

    def on_message_complete(self) -> None:
        self.head = True
        super().on_message_complete()


class Down(asyncio.Protocol):
    __slots__ = ("parser", "transport", "busy", "data")

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.busy = False

    def connection_made(self, t) -> None:
        self.transport = t

    def data_received(self, data: bytes) -> None:
        self.data = data
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_message_complete(self) -> None:
        head = self.data if NOSTRIP else strip_hop(self.data)
        self.busy = True
        forward(self, head, POOL, Up)


if __name__ == "__main__":
    serve(Down)
