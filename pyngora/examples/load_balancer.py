"""A round-robin load balancer with passive health (Pingora's load_balancer example).

    python -m pyngora.examples.load_balancer --upstream 127.0.0.1:8001 --upstream 127.0.0.1:8002
    curl -i localhost:6188/

Each request goes to the next backend; a backend that refuses connections is skipped for a
few seconds in this worker (``report_failure``) and the request is retried on the next one.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

from pyngora.errors import Error, ErrorSource, ErrorType
from pyngora.examples._common import parse, serve
from pyngora.lb import LoadBalancer
from pyngora.proxy import ProxyHttp, Session
from pyngora.upstreams.peer import HttpPeer


class LB(ProxyHttp):
    def __init__(self, upstreams: Sequence[str]) -> None:
        self.lb = LoadBalancer.try_from_iter(upstreams)

    async def upstream_peer(self, session: Session, ctx: Any) -> HttpPeer:
        backend = self.lb.select(b"", 256)
        if backend is None:
            raise Error.new(ErrorType.NoUpstream, ErrorSource.Upstream, context="all backends down")
        return HttpPeer(backend.addr)

    async def fail_to_connect(self, session: Session, peer: HttpPeer, ctx: Any,
                              e: Error) -> Error:
        for b in self.lb.backends():
            if b.addr == peer.address:
                self.lb.report_failure(b)
        return e.set_retry(True)

    async def upstream_request_filter(self, session: Session, upstream_request: Any,
                                      ctx: Any) -> None:
        upstream_request.insert_header("X-Forwarded-For", session.client_ip or "unix")


def main(argv: Optional[Sequence[str]] = None) -> None:
    ns, opt = parse(argv, "pyngora round-robin load balancer")
    serve(opt, "load_balancer", ns.listen, lambda: LB(ns.upstream))


if __name__ == "__main__":
    main()
