"""An authentication filter in front of one upstream (Pingora's request_filter idiom).

    PYNGORA_EXAMPLE_TOKEN=s3cret python -m pyngora.examples.auth --upstream 127.0.0.1:8001
    curl -i localhost:6188/                                   # 401
    curl -i -H 'Authorization: Bearer s3cret' localhost:6188/ # proxied

``request_filter`` answers 401 (with ``WWW-Authenticate``) and returns True when the bearer
token is missing or wrong: the request never reaches the upstream. The token is removed
before the request goes up, and ``logging`` counts the refusals.
"""
from __future__ import annotations

import hmac
import os
from typing import Any, Optional, Sequence

from pyngora.examples._common import parse, serve
from pyngora.headers import Headers
from pyngora.proxy import ProxyHttp, Session
from pyngora.upstreams.peer import HttpPeer


class AuthGate(ProxyHttp):
    def __init__(self, upstream: str, token: str) -> None:
        self.upstream = upstream
        self.expected = b"Bearer " + token.encode()
        self.refused = 0

    async def request_filter(self, session: Session, ctx: Any) -> bool:
        got = session.get_header("authorization") or b""
        if hmac.compare_digest(got, self.expected):
            return False
        self.refused += 1
        await session.respond(401, b"", Headers([("WWW-Authenticate", 'Bearer realm="pyngora"'),
                                                 ("Cache-Control", "no-store")]))
        return True

    async def upstream_peer(self, session: Session, ctx: Any) -> HttpPeer:
        return HttpPeer(self.upstream)

    async def upstream_request_filter(self, session: Session, upstream_request: Any,
                                      ctx: Any) -> None:
        upstream_request.remove_header("Authorization")  # the upstream does not need it


def main(argv: Optional[Sequence[str]] = None) -> None:
    ns, opt = parse(argv, "pyngora bearer-token auth filter")
    token = os.environ.get("PYNGORA_EXAMPLE_TOKEN", "secret")
    serve(opt, "auth", ns.listen, lambda: AuthGate(ns.upstream[0], token))


if __name__ == "__main__":
    main()
