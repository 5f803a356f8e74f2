"""A lean proxy that remembers: the third experiment beside tests/bench/lean.py and lean_raw.py.

    python -m tests.bench.lean_cached STATIC_PORT PROXY_PORT ORIGIN_PORT BODY    (as floor.py)

As lean_raw.py (pooled upstream connections, hop-by-hop fields dropped), but with what
pyngora's express lane remembers: a request read before goes upstream from a table lookup
(its bytes -> the bytes to send, learnt by parsing it the first time), and a whole plain
response is taken by ``pyngora.protocols.h1_splice.take_whole`` (one lookup of the head's
verdict). Everything else of the express lane is left out: the balancer, timeouts, metrics,
keep-alive bookkeeping, the per-request objects and the batching. So it says what a correct
proxy's two lookups cost in this layout, and what pyngora's own bookkeeping adds on top of
them. Assumes what wrk does (one request per read, no pipelining): an experiment, not a proxy.
"""
from __future__ import annotations

import asyncio
from typing import Optional

import httptools

from pyngora.protocols.h1 import H1Limits
from pyngora.protocols.h1_splice import take_whole
from tests.bench import lean_raw
from tests.bench.lean import PooledUp, forward, serve
from tests.bench.lean_raw import strip_hop

POOL: list = []
LIMITS = H1Limits()
# request bytes -> the bytes to send upstream (bounded as pyngora's tables)
KNOWN: dict[bytes, bytes] = {}


class Up(PooledUp):
    pool = POOL

    def __init__(self) -> None:
        self.parser: Optional[httptools.HttpResponseParser] = None
        self.down = None
        self.transport = None

    def data_received(self, data: bytes) -> None:
        down = self.down
        if self.parser is None:
            whole = take_whole(data, LIMITS)
            if whole is not None:
                _, head, body, keep_alive = whole
                self.down = None
                if keep_alive:
                    self.pool.append(self)
                down.busy = False
                if not down.transport.is_closing():  # (uvloop raises on a closed one)
                    down.transport.write(head + body)
                return
            # not whole or not plain: llhttp from here to the response's end
            self.parser = httptools.HttpResponseParser(self)
            i = data.find(b"\r\n\r\n")
            data = strip_hop(data[:i]) + data[i:] if i >= 0 else data
        self.parser.feed_data(data)
        down.transport.write(data)

    def on_message_complete(self) -> None:
        keep = self.parser.should_keep_alive()
        self.parser = None
        down = self.down
        self.down = None
        if keep:
            self.pool.append(self)
        down.busy = False


class Down(lean_raw.Down):
    """lean_raw's downstream side, with the table of requests read before."""

    def data_received(self, data: bytes) -> None:
        out = KNOWN.get(data)
        if out is not None:
            self.busy = True
            forward(self, out, POOL, Up)
            return
        super().data_received(data)  # llhttp, then on_message_complete

    def on_message_complete(self) -> None:
        out = strip_hop(self.data)
        if len(KNOWN) >= 512:
            KNOWN.clear()
        KNOWN[self.data] = out
        self.busy = True
        forward(self, out, POOL, Up)


if __name__ == "__main__":
    serve(Down)
