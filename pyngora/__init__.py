"""pyngora: a production reverse-proxy server and framework, built the way Pingora is built.

Public names (SPEC section 6) are imported lazily, so the master process — which imports this
package first — never loads uvloop, httptools, h2 or prometheus_client.
"""
from __future__ import annotations

from typing import Any

from pyngora.version import __version__

_NAMES = {
    "Server": "pyngora.server.server",
    "Opt": "pyngora.server.server",
    "ProxyHttp": "pyngora.proxy.phases",
    "Session": "pyngora.proxy.session",
    "HttpPeer": "pyngora.upstreams.peer",
    "PeerOptions": "pyngora.upstreams.peer",
    "Error": "pyngora.errors",
    "ErrorType": "pyngora.errors",
    "ErrorSource": "pyngora.errors",
    "RequestHeader": "pyngora.headers",
    "ResponseHeader": "pyngora.headers",
    "http_proxy_service": "pyngora.proxy",
    "background_service": "pyngora.services.base",
    "BackgroundService": "pyngora.services.base",
    "Service": "pyngora.services.base",
    "ShutdownWatch": "pyngora.services.base",
    "StaticService": "pyngora.services.static",
    "prometheus_http_service": "pyngora.metrics.service",
}

__all__ = ["__version__", *_NAMES]


def __getattr__(name: str) -> Any:
    module = _NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'pyngora' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
