"""Access log lines (proxy/access.py): combined and JSON, from a real request's Session."""
from __future__ import annotations

import json
from typing import Any, Optional

from pyngora.errors import Error
from pyngora.proxy import ProxyHttp, Session, http_proxy_service
from pyngora.proxy.access import format_line
from pyngora.upstreams.peer import HttpPeer

from tests.protocol.test_http_app import static
from tests.protocol.test_http_app_helpers import Client, run, serving


class Capture(ProxyHttp):
    def __init__(self, port: int) -> None:
        self.port = port
        self.lines: list[tuple[str, str]] = []

    async def upstream_peer(self, session: Session, ctx: Any) -> HttpPeer:
        return HttpPeer(f"127.0.0.1:{self.port}", upstream="origin")

    async def logging(self, session: Session, e: Optional[Error], ctx: Any) -> None:
        self.lines.append((format_line(session, e, "combined"), format_line(session, e, "json")))


def test_combined_and_json_lines() -> None:
    async def main() -> list[tuple[str, str]]:
        async with serving(static("hello")) as (oport, _):
            cap = Capture(oport)
            async with serving(http_proxy_service(None, cap)) as (pport, _):
                c = await Client.connect(pport)
                await c.request("GET", "/p?q=1", headers=(("User-Agent", 'ua "x"'),
                                                          ("Referer", "http://r/")))
                return cap.lines

    (combined, js), = run(main())
    assert combined.startswith('127.0.0.1 - - [')
    assert '"GET /p?q=1 HTTP/1.1" 200 5 "http://r/" "ua \\"x\\""' in combined
    d = json.loads(js)
    assert d["status"] == 200 and d["uri"] == "/p?q=1" and d["body_bytes_sent"] == 5
    assert d["user_agent"] == 'ua "x"' and d["upstream_status"] == 200 and d["error"] is None
    assert d["upstream"].startswith("127.0.0.1:")
