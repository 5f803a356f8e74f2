"""What each piece of the request path costs, in microseconds, on this machine:

    .venv/bin/python -m tests.bench.micro

The per-request budget at a target rate is 1e6 / rate us (nginx's small-response rate in the
same layout divided by 0.8, say), so these figures say which layer a target cannot afford.
Run by hand, pinned or not; nothing here is a test. Items whose API is missing are skipped.
"""
from __future__ import annotations

import asyncio
import sys
import timeit
from typing import Callable

# What wrk sends, and what the origin (nginx) answers, in the small scenario.
REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Fri, 27 Nov 2026 04:00:00 GMT\r\n"
            b"Content-Type: text/plain\r\nContent-Length: 52\r\nConnection: keep-alive\r\n\r\n"
            + b"x" * 52)


def per_call_us(fn: Callable[[], object], number: int = 20000) -> float:
    """Best of 5 timings of ``fn``, in microseconds per call."""
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def sync_items() -> list[tuple[str, Callable[[], object]]]:
    """The request path's synchronous pieces, as far as the current tree has them."""
    items: list[tuple[str, Callable[[], object]]] = []
    try:
        from pyngora.headers import Headers
        from pyngora.protocols import h1
    except ImportError as e:
        print(f"skipped the pyngora items: {e}", file=sys.stderr)
        return items
    parser = h1.RequestParser()
    items.append(("RequestParser.feed(wrk's GET)", lambda: parser.feed(REQUEST)))
    resp_cls = getattr(h1, "ResponseParser", None)
    if resp_cls is not None:
        rp = resp_cls()

        def response() -> object:
            rp.start(b"GET")
            return rp.feed(RESPONSE)
        items.append(("ResponseParser.start+feed(nginx's 200)", response))
    hdrs = Headers([(b"Host", b"127.0.0.1:8080"), (b"User-Agent", b"wrk"),
                    (b"Accept", b"*/*"), (b"Connection", b"keep-alive")])
    items.append(("Headers.copy (4 fields)", hdrs.copy))
    rhh = getattr(h1, "remove_hop_by_hop", None)
    if rhh is not None:
        items.append(("Headers.copy + remove_hop_by_hop", lambda: rhh(hdrs.copy())))
    items.append(("Headers.serialize (4 fields)", hdrs.serialize))
    items.append(("Headers.get (present)", lambda: hdrs.get(b"host")))
    items.append(("Headers.get_all (absent)", lambda: hdrs.get_all(b"connection-x")))
    return items


async def async_items(n: int) -> list[tuple[str, float]]:
    """Event-loop primitives the request path uses per request, timed inside the loop."""
    loop = asyncio.get_running_loop()
    out: list[tuple[str, float]] = []

    async def nothing() -> None:
        return None

    t = loop.time()
    for _ in range(n):
        await loop.create_task(nothing())
    out.append(("create_task + await (trivial coroutine)", (loop.time() - t) / n * 1e6))

    t = loop.time()
    for _ in range(n):
        fut = loop.create_future()
        loop.call_soon(fut.set_result, True)
        await fut
    out.append(("create_future + call_soon(set_result) + await", (loop.time() - t) / n * 1e6))

    def noop() -> None:
        return None

    t = loop.time()
    for _ in range(n):
        loop.call_later(60.0, noop).cancel()
    out.append(("call_later(60) + cancel", (loop.time() - t) / n * 1e6))

    t = loop.time()
    for _ in range(n):
        loop.call_soon(noop)
    await asyncio.sleep(0)
    out.append(("call_soon (run on the next turn)", (loop.time() - t) / n * 1e6))
    return out


def main() -> int:
    rows: list[tuple[str, float]] = []
    for name, fn in sync_items():
        try:
            rows.append((name, per_call_us(fn)))
        except Exception as e:  # an API that changed under us: say so, keep going
            print(f"skipped {name}: {e!r}", file=sys.stderr)
    try:
        import uvloop
        uvloop.install()
        loop_name = "uvloop"
    except ImportError:
        loop_name = "asyncio"
    rows += [(f"{name} [{loop_name}]", us) for name, us in asyncio.run(async_items(50000))]
    print("| piece | us per call |\n|---|---:|")
    for name, us in rows:
        print(f"| {name} | {us:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
