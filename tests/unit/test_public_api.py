"""SPEC section 6's import lines work, and `import pyngora` (what the master imports first)
loads none of the request path's heavy packages."""
from __future__ import annotations

import subprocess
import sys


def test_spec_section_6_imports() -> None:
    from pyngora import (Error, ErrorType, HttpPeer, Opt, PeerOptions, ProxyHttp, Server,
                         Session, background_service, http_proxy_service,
                         prometheus_http_service)
    from pyngora.lb import (Backend, Consistent, FnvHash, HttpHealthCheck, LoadBalancer, Random,
                            RoundRobin, TcpHealthCheck)
    server = Server(None)
    assert server.configuration.threads == 1 and isinstance(Opt.parse_args([]), Opt)
    assert all(callable(x) for x in (http_proxy_service, background_service,
                                      prometheus_http_service))
    assert LoadBalancer.try_from_iter(["127.0.0.1:1"]).select(b"") == Backend("127.0.0.1:1")
    assert {Error, ErrorType, HttpPeer, PeerOptions, ProxyHttp, Session, Consistent, FnvHash,
            HttpHealthCheck, Random, RoundRobin, TcpHealthCheck}


def test_import_pyngora_is_light() -> None:
    code = ("import sys, pyngora, pyngora.server.master; "
            "print(sorted(m for m in ('uvloop', 'httptools', 'h2', 'prometheus_client') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.strip() == "[]", out.stderr
