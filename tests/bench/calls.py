"""Python function calls per proxied request (sys.setprofile), the fast path in one process.

    .venv/bin/python -m tests.bench.calls [--body BYTES] [--requests N] [--churn] [--top N]

Counts are exact, not sampled: each Python-level call costs roughly 0.1-0.3 us on this
machine, so the table says which layers a request passes through and how often."""
from __future__ import annotations

import argparse
import asyncio
import collections
import sys
from typing import Any

import uvloop

from tests.bench.fastpath_ab import pinned_origin, start_proxy


async def _client(port: int, n: int, churn: bool = False) -> None:
    """Keep-alive GETs on 8 connections, one outstanding request each (as wrk does); with
    ``churn``, a new connection per request (``Connection: close``)."""
    async def closing(count: int) -> None:
        for _ in range(count):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            await r.read()
            w.close()

    async def one(count: int) -> None:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(count):
            w.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            head = await r.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await r.readexactly(length)
        w.close()
    await asyncio.gather(*((closing if churn else one)(n // 8) for _ in range(8)))


async def main(a: argparse.Namespace) -> None:
    async with pinned_origin(a.body) as oport:
        svc, ctx, server, port = await start_proxy(oport, "<calls>")
        await _client(port, 800)  # warm: pool filled, caches built
        counts: collections.Counter[str] = collections.Counter()

        def prof(frame: Any, event: str, arg: Any) -> None:
            if event == "call":
                co = frame.f_code
                if "pyngora" in co.co_filename:
                    counts[f"{co.co_qualname} ({co.co_filename.split('pyngora/')[-1]})"] += 1
            elif event == "c_call" and "pyngora" in frame.f_code.co_filename:
                counts[f"  C {getattr(arg, '__qualname__', arg)}"] += 1

        n = a.requests
        sys.setprofile(prof)
        await _client(port, n, a.churn)
        sys.setprofile(None)
        total = sum(v for k, v in counts.items() if not k.startswith("  C"))
        ctotal = sum(v for k, v in counts.items() if k.startswith("  C"))
        print(f"{n} requests: {total / n:.1f} pyngora Python calls and {ctotal / n:.1f} C calls "
              f"from pyngora code per request")
        for k, v in counts.most_common(a.top):
            print(f"{v / n:6.2f}  {k}")
        server.close()
        await svc.stop_worker(ctx)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--body", type=int, default=13)
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--top", type=int, default=80)
    ap.add_argument("--churn", action="store_true", help="a new connection per request")
    uvloop.run(main(ap.parse_args()))
