"""The HTTP proxy: ProxyHttp phases, the per-request Session, the phase engine, and the
service that runs them in each worker (Pingora's pingora-proxy).

    from pyngora.proxy import ProxyHttp, Session, http_proxy_service
    svc = http_proxy_service(server.configuration, MyProxy(), name="my_proxy")
    svc.add_tcp("0.0.0.0:6188")
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Union

from pyngora.config.schema import LimitsConf, ServerConf, ServiceConf
from pyngora.proxy.engine import ProxyEngine
from pyngora.proxy.phases import ProxyHttp
from pyngora.proxy.session import Session
from pyngora.services.base import WorkerContext
from pyngora.services.http_app import HttpApp
from pyngora.services.http_service import HttpService
from pyngora.upstreams.connector import Connector

try:
    from pyngora.metrics import registry as _registry
except Exception:  # pragma: no cover
    _registry = None  # type: ignore[assignment]

__all__ = ["ProxyHttp", "Session", "ProxyService", "http_proxy_service", "proxy_service"]

ProxyLike = Union[ProxyHttp, Callable[[], ProxyHttp]]


class ProxyService(HttpService):
    """A listening service running a ProxyHttp (``type: http_proxy``, or from Python).

    ``proxy`` is a ProxyHttp instance (built in the master, carried into each worker by fork)
    or a zero-argument factory called once in each worker. A proxy with an
    ``async worker_started(ctx)`` method gets it called in each worker before it accepts
    (the declarative proxy builds its balancers there). Per worker: one Connector (pool of
    ``upstream_keepalive_pool_size``, ``ca_file``), ``max_retries`` from the server conf.
    """

    kind = "http_proxy"

    def __init__(self, name: str, proxy: ProxyLike, conf: Optional[ServiceConf] = None,
                 limits: Optional[LimitsConf] = None) -> None:
        super().__init__(name, conf, limits)
        self.proxy = proxy

    def _proxy_instance(self) -> ProxyHttp:
        proxy = self.proxy
        return proxy if isinstance(proxy, ProxyHttp) else proxy()

    async def start_worker(self, ctx: WorkerContext) -> None:
        sc = ctx.server_conf
        connector = Connector(sc.upstream_keepalive_pool_size, sc.ca_file)
        ctx.state["connector"] = connector
        if _registry is not None:
            ctx.state["service_metrics"] = _registry.service_metrics(self.name)
        proxy = self._proxy_instance()
        hook = getattr(proxy, "worker_started", None)
        if hook is not None:
            await hook(ctx)
        ctx.state["http_app"] = ProxyEngine(proxy, connector, sc.max_retries, self.name,
                                            sc.access_log_format)

    def new_app(self, ctx: WorkerContext) -> HttpApp:
        # Only reached when start_worker was not run (tests driving the factory directly).
        sc = ctx.server_conf
        connector = ctx.state.setdefault(
            "connector", Connector(sc.upstream_keepalive_pool_size, sc.ca_file))
        return ProxyEngine(self._proxy_instance(), connector, sc.max_retries, self.name,
                           sc.access_log_format)

    async def stop_worker(self, ctx: WorkerContext) -> None:
        connector = ctx.state.get("connector")
        if connector is not None:
            connector.close_all()
        app = ctx.state.get("http_app")
        h2 = getattr(app, "h2_connector", None)
        if h2 is not None:  # idle HTTP/2 upstream connections go with the worker
            h2.close_all()
        hook = getattr(getattr(app, "proxy", None), "worker_stopped", None)
        if hook is not None:
            await hook(ctx)


def http_proxy_service(conf: Optional[ServerConf], proxy: ProxyLike, name: str = "proxy",
                       limits: Optional[LimitsConf] = None) -> ProxyService:
    """Pingora's ``http_proxy_service(&server.configuration, proxy)``: a service running
    ``proxy``; add listeners with ``add_tcp`` / ``add_uds`` / ``add_tls``. ``conf`` is accepted
    for Pingora's signature; the worker's ServerConf is what the service uses at run time."""
    return ProxyService(name, proxy, None, limits)


def proxy_service(service_conf: ServiceConf, balancer_factory: Optional[Callable[[Any], Any]] = None
                  ) -> ProxyService:
    """The ``type: http_proxy`` service of a YAML ``ServiceConf`` (see proxy/declarative.py)."""
    from pyngora.proxy.declarative import build_proxy_service
    return build_proxy_service(service_conf, balancer_factory)
