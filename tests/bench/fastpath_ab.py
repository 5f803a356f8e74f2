"""The fast path against the phase engine, in one process: the difference without the noise.

    .venv/bin/python -m tests.bench.fastpath_ab [--body BYTES] [--seconds S] [--rounds N]
        [--churn] [--gc]

One pyngora proxy service (the YAML ``http_proxy``, one backend, as in the bench) is served
by uvloop in this process, pinned to CPU 0; a minimal origin (a fixed nginx-like response,
pre-built) and ``wrk -c 50`` run on CPU 1. Runs alternate between the fast path and the
engine (``ProxyEngine.fast`` set to None) on the same sockets, pool and interpreter, and
each reports this process's own user and system CPU per request (getrusage), so a shared
machine's load moves both modes alike. ``--gc`` also prints the garbage collections each run
triggered (reference cycles per request show up there first). Prints medians at the end.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import re
import resource
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, AsyncIterator

import uvloop

from pyngora.config.loader import parse_text
from pyngora.config.schema import parse_address
from pyngora.proxy.declarative import build_proxy_service
from pyngora.services.base import WorkerContext
from tests.bench.tools import free_port

ORIGIN = r'''
import asyncio, sys, uvloop
body = b"x" * int(sys.argv[2])
resp = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Fri, 27 Nov 2026 05:00:00 GMT\r\n"
        b"Content-Type: text/plain\r\nContent-Length: %d\r\nConnection: keep-alive\r\n"
        b"Accept-Ranges: bytes\r\n\r\n" % len(body)) + body
class P(asyncio.Protocol):
    def connection_made(self, t): self.t, self.buf = t, b""
    def data_received(self, d):
        self.buf += d
        while b"\r\n\r\n" in self.buf:
            _, _, self.buf = self.buf.partition(b"\r\n\r\n")
            self.t.write(resp)
async def main():
    await asyncio.get_running_loop().create_server(P, "127.0.0.1", int(sys.argv[1]), backlog=1024)
    await asyncio.Event().wait()
uvloop.run(main())
'''


def _cpu() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


async def _wait_port(port: int) -> None:
    for _ in range(200):
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.02)
    raise RuntimeError("the origin did not start")


async def start_proxy(origin_port: int, name: str) -> tuple[Any, WorkerContext, Any, int]:
    """The bench's proxy service (YAML ``http_proxy``, one backend: ``origin_port``) started
    as a worker would, in this process: (service, context, server, port)."""
    conf = parse_text(f"""version: 1
services:
  - name: proxy
    type: http_proxy
    listeners: ["127.0.0.1:0"]
    upstreams: [{{name: o, backends: [{{addr: "127.0.0.1:{origin_port}"}}]}}]
""", name)
    svc = build_proxy_service(conf, conf.services[0])
    loop = asyncio.get_running_loop()
    ctx = WorkerContext(svc, 0, 0, conf, loop)
    await svc.start_worker(ctx)
    server = await loop.create_server(svc.protocol_factory(ctx, parse_address("127.0.0.1:0")),
                                      "127.0.0.1", 0, backlog=1024)
    return svc, ctx, server, server.sockets[0].getsockname()[1]


@contextlib.asynccontextmanager
async def pinned_origin(body: int) -> AsyncIterator[int]:
    """This process pinned to CPU 0, the ORIGIN on CPU 1 (where wrk runs too): its port."""
    os.sched_setaffinity(0, {0})
    oport = free_port()
    origin = subprocess.Popen(["taskset", "-c", "1", sys.executable, "-c", ORIGIN, str(oport),
                               str(body)])
    try:
        await _wait_port(oport)
        yield oport
    finally:
        origin.kill()
        origin.wait()


@dataclass
class WrkRun:
    """One ``wrk -c 50`` run on CPU 1, and this process's CPU over it."""

    requests: int
    user_us: float  # per request
    system_us: float
    output: bytes


async def wrk_run(url: str, seconds: int, extra: tuple[str, ...] = ()) -> WrkRun:
    """``wrk -c 50 -t 1`` against ``url`` for ``seconds`` (``extra``: more wrk arguments)."""
    u0, s0 = _cpu()
    p = await asyncio.create_subprocess_exec(
        "taskset", "-c", "1", "wrk", "-c", "50", "-t", "1", "-d", f"{seconds}s", *extra, url,
        stdout=subprocess.PIPE)
    out, _ = await p.communicate()
    u1, s1 = _cpu()
    m = re.search(rb"(\d+) requests in", out)
    if m is None:
        raise SystemExit(out.decode())
    n = int(m.group(1))
    return WrkRun(n, (u1 - u0) / n * 1e6, (s1 - s0) / n * 1e6, out)


async def main(a: argparse.Namespace) -> None:
    async with pinned_origin(a.body) as oport:
        svc, ctx, server, port = await start_proxy(oport, "<fastpath_ab>")
        engine = ctx.state["http_app"]
        fast = engine.fast
        if fast is None:
            raise SystemExit("this configuration does not take the fast path")
        extra = ("-H", "Connection: close") if a.churn else ()
        results: dict[str, list[float]] = {"fast path": [], "engine": []}
        for _ in range(a.rounds):
            for mode in ("engine", "fast path"):
                engine.fast = fast if mode == "fast path" else None
                collections = [s["collections"] for s in gc.get_stats()]
                r = await wrk_run(f"http://127.0.0.1:{port}/", a.seconds, extra)
                per = r.user_us + r.system_us
                results[mode].append(per)
                line = (f"{mode:9s} {r.requests:7d} requests  {per:5.1f} us CPU per request "
                        f"(user {r.user_us:4.1f}, system {r.system_us:4.1f})")
                if a.gc:
                    after = [s["collections"] for s in gc.get_stats()]
                    line += f"  gc collections {[y - x for x, y in zip(collections, after)]}"
                print(line, flush=True)
        server.close()
        await svc.stop_worker(ctx)
        med = {k: sorted(v)[len(v) // 2] for k, v in results.items()}
        print(f"median: fast path {med['fast path']:.1f} us, engine {med['engine']:.1f} us "
              f"({(med['fast path'] / med['engine'] - 1) * 100:+.0f} %)")


def parse_args(argv: Any = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--body", type=int, default=13, help="response body bytes (13: wrk's small)")
    ap.add_argument("--seconds", type=int, default=3, help="seconds per run")
    ap.add_argument("--rounds", type=int, default=3, help="alternations")
    ap.add_argument("--churn", action="store_true", help="a new client connection per request")
    ap.add_argument("--gc", action="store_true", help="print garbage collections per run")
    return ap.parse_args(argv)


if __name__ == "__main__":
    uvloop.run(main(parse_args()))
