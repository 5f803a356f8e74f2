"""What the express lane's bookkeeping layers cost, each swapped for a bare stand-in (by hand).

    .venv/bin/python -m tests.bench.layers [--rounds 8] [--seconds 2] [--body 13]

The question it answers: the lane spends ~39 Python calls a request where the lean cached
proxy (``tests/bench/lean_cached.py``) spends a handful, and no function in py-spy is over a
few per cent -- so which of the lane's layers, if any, is worth a redesign? Each layer is
replaced, in this one process, by the least that still proxies correctly, and the process's
user and system CPU per request (getrusage) is compared with the real code's, in rounds that
alternate the modes on the same sockets, pool and interpreter (``tests.bench.fastpath_ab``'s
layout: proxy pinned to CPU 0, origin and ``wrk -c 50`` on CPU 1):

- ``metrics``: the service's and the upstream group's ``request_done`` do nothing;
- ``pool``: ``Connector.get_pooled`` / ``release`` keep a bare list per peer address (no
  reuse key, idle deadline, LRU bound or sweep);
- ``timers``: the downstream connection's lazy timer and the upstream read deadline are
  not armed;
- ``all``: the three together;
- ``lean``: for scale, ``tests/bench/lean_cached.py``'s proxy served by this process.

The stand-ins drop what the SPEC requires (metrics, pool limits, timeouts): an experiment,
never a configuration. A mode whose run saw an error or a non-2xx response is reported as
broken. The minimum over rounds is the least noisy figure on a shared host; the median is
printed beside it.
"""
from __future__ import annotations

import argparse
import asyncio
from typing import Any, Callable

import uvloop

from pyngora.metrics import registry
from pyngora.services.lazy_timer import LazyTimer
from pyngora.upstreams.connector import Connector
from pyngora.upstreams.h1_upstream import UpstreamConnection
from tests.bench import lean, lean_cached
from tests.bench.fastpath_ab import pinned_origin, start_proxy, wrk_run
from tests.bench.tools import free_port

MODES = ("real", "metrics", "pool", "timers", "all", "lean")

_REAL: dict[str, tuple[Any, str, Callable[..., Any]]] = {
    "service_done": (registry.ServiceMetrics, "request_done",
                     registry.ServiceMetrics.request_done),
    "upstream_done": (registry.UpstreamMetrics, "request_done",
                      registry.UpstreamMetrics.request_done),
    "get_pooled": (Connector, "get_pooled", Connector.get_pooled),
    "release": (Connector, "release", Connector.release),
    "arm": (LazyTimer, "_arm", LazyTimer._arm),
    "arm_deadline": (UpstreamConnection, "_arm_deadline", UpstreamConnection._arm_deadline),
}

# The bare pool: peer address -> idle connections, most recent last.
_BARE: dict[Any, list[UpstreamConnection]] = {}


def _nothing(*_: Any) -> None:
    return None


def _bare_get(self: Connector, peer: Any) -> Any:
    idle = _BARE.get(peer.address)
    if not idle:
        return None  # the lane dials, as with an empty pool
    conn = idle.pop()
    conn.peer = peer
    conn._idle = False
    conn.response_bytes_seen = False
    return conn


def _bare_release(self: Connector, conn: UpstreamConnection, reusable: bool) -> None:
    conn._listener = None
    conn._sink = None
    if reusable and conn.can_reuse():
        conn._idle = True
        _BARE.setdefault(conn.peer.address, []).append(conn)
    else:
        conn.close()


def _no_timer(self: LazyTimer, delay: Any, callback: Any) -> None:
    self._deadline = None


def _set_mode(mode: str) -> None:
    for name, (cls, attr, real) in _REAL.items():
        setattr(cls, attr, real)
    for conns in _BARE.values():  # the real pool starts over without them
        for conn in conns:
            conn.close()
    _BARE.clear()
    if mode in ("metrics", "all"):
        registry.ServiceMetrics.request_done = _nothing  # type: ignore[method-assign]
        registry.UpstreamMetrics.request_done = _nothing  # type: ignore[method-assign]
    if mode in ("pool", "all"):
        Connector.get_pooled = _bare_get  # type: ignore[method-assign]
        Connector.release = _bare_release  # type: ignore[method-assign]
    if mode in ("timers", "all"):
        LazyTimer._arm = _no_timer  # type: ignore[method-assign]
        UpstreamConnection._arm_deadline = _nothing  # type: ignore[method-assign]


async def main(a: argparse.Namespace) -> None:
    async with pinned_origin(a.body) as oport:
        svc, ctx, server, port = await start_proxy(oport, "<layers>")
        lean.ORIGIN[0] = oport
        lean_port = free_port()
        lean_server = await asyncio.get_running_loop().create_server(
            lean_cached.Down, "127.0.0.1", lean_port, backlog=1024)
        results: dict[str, list[tuple[float, float]]] = {m: [] for m in MODES}
        broken: set[str] = set()
        for _ in range(a.rounds):
            for mode in MODES:
                _set_mode(mode)
                r = await wrk_run(f"http://127.0.0.1:{lean_port if mode == 'lean' else port}/",
                                  a.seconds)
                if b"Non-2xx" in r.output or b"Socket errors" in r.output:
                    broken.add(mode)
                results[mode].append((r.user_us, r.system_us))
                print(f"{mode:8s} {r.requests / a.seconds:8.0f} req/s  user {r.user_us:5.1f}"
                      f"  system {r.system_us:5.1f} us per request", flush=True)
        _set_mode("real")
        lean_server.close()
        server.close()
        await svc.stop_worker(ctx)
    base = min(u for u, _ in results["real"])
    print("\n| stand-in | user us/req, min | median | system, median | user saved (min) |")
    print("|---|---:|---:|---:|---:|")
    for mode in MODES:
        users = sorted(u for u, _ in results[mode])
        systems = sorted(s for _, s in results[mode])
        note = " (BROKEN: errors or non-2xx)" if mode in broken else ""
        print(f"| {mode}{note} | {users[0]:.2f} | {users[len(users) // 2]:.2f} | "
              f"{systems[len(systems) // 2]:.2f} | {base - users[0]:+.2f} |")


def parse_args(argv: Any = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--body", type=int, default=13, help="response body bytes (13: wrk's small)")
    ap.add_argument("--seconds", type=int, default=2, help="seconds per run")
    ap.add_argument("--rounds", type=int, default=8, help="alternations")
    return ap.parse_args(argv)


if __name__ == "__main__":
    uvloop.install()
    asyncio.run(main(parse_args()))
