"""HttpService: a listening service that speaks HTTP through an :class:`HttpApp` -- the base of
the static, proxy and metrics services. It builds the per-worker app and, per listener, the
protocol factory (HTTP/1, or HTTP/2 by ALPN or the h2c preface: ``services.h2_dispatch``)."""
from __future__ import annotations

import asyncio
import sys
from typing import Any, Callable, Optional

from pyngora.config.schema import LimitsConf, ListenerConf
from pyngora.services.base import Service, WorkerContext
from pyngora.services.http_exchange import HttpApp, HttpSettings

__all__ = ["HttpService"]


class HttpService(Service):
    """A listening service that speaks HTTP/1 through an :class:`HttpApp`.

    Subclasses implement ``new_app(ctx)`` (runs in each worker, from ``start_worker``) and may
    override ``start_worker`` to build more per-worker state first (call ``super()``).
    ``ctx.state["service_metrics"]``, when someone put one there, gets per-request and
    per-connection counts (``request_done``, ``connection_opened``, ``connection_closed``).
    """

    kind = "http"

    def __init__(self, name: str, conf: Any = None, limits: Optional[LimitsConf] = None) -> None:
        super().__init__(name, conf)
        if limits is None and conf is not None:
            limits = getattr(getattr(conf, "spec", None), "limits", None)
        self.limits: LimitsConf = limits or LimitsConf()

    def new_app(self, ctx: WorkerContext) -> HttpApp:
        """The per-worker request handler."""
        raise NotImplementedError

    async def start_worker(self, ctx: WorkerContext) -> None:
        if "service_metrics" not in ctx.state:
            # The worker loads the metrics registry when metrics are on; services must not
            # import it (DESIGN's one-way doors), so it is used only if already loaded.
            registry = sys.modules.get("pyngora.metrics.registry")
            if registry is not None:
                ctx.state["service_metrics"] = registry.service_metrics(self.name)
        ctx.state["http_app"] = self.new_app(ctx)

    def ssl_context(self, listener: ListenerConf) -> Any:
        """The listener's server SSLContext (None without ``tls``). Built in each worker of each
        generation, so certificates are re-read on reload and upgrade."""
        if listener.tls is None:
            return None
        from pyngora.protocols.tls import server_context
        return server_context(listener.tls)

    def protocol_factory(self, ctx: WorkerContext,
                         listener: ListenerConf) -> Callable[[], asyncio.BaseProtocol]:
        """HTTP/1, or HTTP/2 when the listener offers it (ALPN ``h2`` over TLS, or ``h2c``
        prior knowledge detected by the preface); plain HTTP/1 listeners pay nothing for it."""
        app = ctx.state.get("http_app")
        if app is None:
            app = ctx.state["http_app"] = self.new_app(ctx)
        from pyngora.services.h2_dispatch import protocol_factory  # (it imports http_app, which imports us)
        return protocol_factory(app, HttpSettings(self.limits), listener, ctx.connections,
                                ctx.state.get("service_metrics"), ctx.loop)

