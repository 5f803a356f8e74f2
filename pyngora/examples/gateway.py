"""A header-rewriting API gateway (Pingora's gateway example, grown a little).

    python -m pyngora.examples.gateway --upstream 127.0.0.1:8001 --upstream 127.0.0.1:8002
    curl -i localhost:6188/api/v1/users      # -> first upstream, as /users

- ``/api/v1/...`` goes to the first upstream with the prefix stripped, everything else to the
  last one. The choice is made on the normalised path (``%XX`` decoded, dot-segments and
  ``//`` resolved: ``proxy.route_path``), as nginx's ``location`` is, so ``/x/../api/v1/a``
  is an API request and ``/api/v1/../../admin`` is not; an API request goes up with that
  normalised path, re-escaped, less the prefix (as nginx's ``proxy_pass`` with a URI does);
- every request gets an ``X-Request-Id`` (kept if the client sent one) and loses ``Cookie``
  on its way to ``/api``;
- every response gets ``X-Request-Id`` and ``Server: pyngora-gateway`` and loses the
  upstream's ``Server`` and ``X-Powered-By``.
"""
from __future__ import annotations

import itertools
import os
from typing import Any, Optional, Sequence
from urllib.parse import quote

from pyngora.examples._common import parse, serve
from pyngora.proxy import ProxyHttp, Session
from pyngora.proxy.route_path import route_path
from pyngora.upstreams.peer import HttpPeer

API_PREFIX = "/api/v1"


class GatewayCtx:
    __slots__ = ("request_id", "api", "path")

    def __init__(self) -> None:
        self.request_id = ""
        self.api = False
        self.path = "/"  # the normalised path (route_path)


class Gateway(ProxyHttp):
    def __init__(self, upstreams: Sequence[str]) -> None:
        self.api_upstream = upstreams[0]
        self.web_upstream = upstreams[-1]
        self._ids = itertools.count(1)
        self._prefix = f"{os.getpid():x}-"

    def new_ctx(self) -> GatewayCtx:
        return GatewayCtx()

    async def request_filter(self, session: Session, ctx: GatewayCtx) -> bool:
        rid = session.get_header("x-request-id")
        ctx.request_id = rid.decode("latin-1") if rid else f"{self._prefix}{next(self._ids)}"
        path = ctx.path = route_path(session.req_header.uri)
        ctx.api = path == API_PREFIX or path.startswith(API_PREFIX + "/")
        return False

    async def upstream_peer(self, session: Session, ctx: GatewayCtx) -> HttpPeer:
        return HttpPeer(self.api_upstream if ctx.api else self.web_upstream)

    async def upstream_request_filter(self, session: Session, upstream_request: Any,
                                      ctx: GatewayCtx) -> None:
        upstream_request.insert_header("X-Request-Id", ctx.request_id)
        if ctx.api:
            # (route_path decoded %XX to one latin-1 character per byte: the same bytes back)
            rest = quote(ctx.path[len(API_PREFIX):] or "/", safe="/:@!$&'()*+,;=~",
                         encoding="latin-1")
            query = upstream_request.uri.partition("?")[2]
            upstream_request.set_uri(rest + "?" + query if query else rest)
            upstream_request.remove_header("Cookie")

    async def response_filter(self, session: Session, upstream_response: Any,
                              ctx: GatewayCtx) -> None:
        upstream_response.remove_header("X-Powered-By")
        upstream_response.insert_header("Server", "pyngora-gateway")
        upstream_response.insert_header("X-Request-Id", ctx.request_id)


def main(argv: Optional[Sequence[str]] = None) -> None:
    ns, opt = parse(argv, "pyngora header-rewriting gateway")
    serve(opt, "gateway", ns.listen, lambda: Gateway(ns.upstream))


if __name__ == "__main__":
    main()
