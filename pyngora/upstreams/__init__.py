"""Upstreams: peers (where to connect) and the connector (pooled HTTP/1.1 client connections).

``HttpPeer`` and ``PeerOptions`` are cheap to import; ``Connector`` and ``UpstreamConnection``
are loaded on first use (they pull in the protocol parsers).
"""
from __future__ import annotations

from typing import Any

from pyngora.upstreams.peer import HttpPeer, PeerOptions

__all__ = ["HttpPeer", "PeerOptions", "Connector", "UpstreamConnection"]


def __getattr__(name: str) -> Any:
    if name in ("Connector", "UpstreamConnection"):
        from pyngora.upstreams import connector
        return getattr(connector, name)
    raise AttributeError(name)
