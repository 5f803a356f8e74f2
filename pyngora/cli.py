"""The command line, and the composition root: YAML services -> Service objects.

Only this module (and ``pyngora/__init__``) imports across rooms.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from typing import TYPE_CHECKING, Any, Optional, Sequence

from pyngora.config.schema import ConfigError, ConfigIssue, ServerConf, ServiceConf
from pyngora.server.preflight import server_issues
from pyngora.server.server import Opt, Server

if TYPE_CHECKING:  # pragma: no cover
    from pyngora.server.deferred import PlannedService
    from pyngora.services.base import Service

# The master imports this module, so the rooms it composes (services, proxy, lb, metrics,
# protocols: asyncio, ssl, h2, httptools) are imported inside functions, and only where a
# service is really built: in `-t`, in the check child and in the workers (see
# pyngora/server/deferred.py). tests/process/test_footprint.py keeps this true.


def load_object(spec: str) -> Any:
    """``module:attr`` -> the attribute (a ProxyHttp or BackgroundService class)."""
    mod, sep, attr = spec.partition(":")
    if not sep or not mod or not attr:
        raise ValueError(f"expected module:Class, got {spec!r}")
    obj: Any = importlib.import_module(mod)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def build_service(conf: ServerConf, sc: ServiceConf) -> Service:
    """One YAML service -> its Service object (imports the app it names)."""
    if sc.type == "static":
        from pyngora.services.static import StaticService
        return StaticService(sc.name, sc)
    if sc.type == "http_proxy":
        from pyngora.proxy.declarative import build_proxy_service
        table = _health_table(conf, sc)
        from pyngora.lb.balancer import load_balancer_from_conf
        return build_proxy_service(conf, sc, load_object,
                                   balancer_factory=lambda u: load_balancer_from_conf(u, table))
    if sc.type == "prometheus":
        from pyngora.metrics.service import PrometheusService
        return PrometheusService(sc.name, sc)
    if sc.type == "background":
        from pyngora.services.base import background_service
        obj = load_object(sc.spec.app)
        task = obj() if isinstance(obj, type) else obj
        svc = background_service(sc.name, task)
        svc.conf = sc
        return svc
    raise ValueError(f"unknown service type {sc.type!r}")


def _needs_prober(sc: ServiceConf) -> bool:
    ups = getattr(sc.spec, "upstreams", ())
    return any(u.health_check.type != "none" or u.discovery.type == "dns" for u in ups)


def _health_table(conf: ServerConf, sc: ServiceConf) -> Optional[str]:
    return conf.health_table_path(sc.name) if _needs_prober(sc) else None


def _prober(conf: ServerConf, sc: ServiceConf) -> Service:
    """One health-check process per proxy service: probes run once per server, whatever the
    worker count, and workers read the shared table (pingora's background health check)."""
    from pyngora.lb.balancer import health_group_from_conf
    from pyngora.lb.health import HealthService
    from pyngora.services.base import background_service
    prober = HealthService(conf.health_table_path(sc.name),
                           [health_group_from_conf(u, conf.ca_file) for u in sc.spec.upstreams])

    class _Task:
        async def start_with_ready_notifier(self, shutdown: Any, ready: Any) -> None:
            await prober.run(shutdown, ready)

    return background_service(f"health-{sc.name}", _Task())


def build_services(conf: ServerConf, index: Optional[Sequence[int]] = None) -> list[Service]:
    """Every service of a configuration; ConfigError naming the service on failure.
    ``index``: each service's place in the file's list (for the issues' lines), when that is
    not its place in ``conf.services`` (a partial configuration, see ``_second_round``).

    A proxy whose upstreams have health checks or DNS discovery gets a prober process and
    depends on it, so it accepts no connection before the first round of checks has run."""
    out: list[Service] = []
    issues: list[ConfigIssue] = []
    tables: list[str] = []
    for i, sc in zip(index if index is not None else range(len(conf.services)), conf.services):
        for j, listener in enumerate(sc.listeners):
            if listener.tls is not None:
                from pyngora.protocols.tls import tls_problems
                for sub, message in tls_problems(listener.tls):
                    path = ("services", i, "listeners", j, "tls") + sub
                    issues.append(ConfigIssue(path, message, _line(conf, path)))
        try:
            svc = build_service(conf, sc)
            if sc.type == "http_proxy" and _needs_prober(sc):
                prober = _prober(conf, sc)
                svc.add_dependency(prober)
                out.append(prober)
                tables.append(conf.health_table_path(sc.name))
            out.append(svc)
        except ConfigError as e:
            issues.extend(e.issues)
        except Exception as e:  # an app that does not import, a bad certificate, ...
            app = getattr(sc.spec, "app", None)
            # A service with an app is the app's code (its import, its constructor): the
            # error is the app's, at its line.
            path = ("services", i, "app") if app else ("services", i)
            why = str(e) or type(e).__name__  # (a MemoryError says nothing)
            message = f"{app}: {why}" if app else f"service {sc.name!r}: {why}"
            issues.append(ConfigIssue(path, message, _line(conf, path)))
    if conf.ca_file:
        import ssl
        try:
            ssl.create_default_context(cafile=conf.ca_file)
        except (OSError, ssl.SSLError) as e:  # every TLS backend's request would get 500
            issues.append(ConfigIssue(("ca_file",), f"cannot load {conf.ca_file}: {e}",
                                      conf.line_of(("ca_file",))))
    if issues:
        raise ConfigError(conf.source, issues)
    for svc in out:
        if hasattr(svc, "health_tables") and tables:
            svc.health_tables = tables
    return out


def _line(conf: ServerConf, path: tuple) -> Optional[int]:
    """The line of ``path``, else of the nearest key above it that has one (a key the file
    does not spell, as a default's, is reported at its parent)."""
    while path:
        line = conf.line_of(path)
        if line is not None:
            return line
        path = path[:-1]
    return None


def _health_tables(conf: ServerConf) -> list[str]:
    return [conf.health_table_path(sc.name) for sc in conf.services
            if sc.type == "http_proxy" and _needs_prober(sc)]


def _build_in_worker(conf: ServerConf, sc: ServiceConf) -> "Service":
    """What `build_services` makes of ``sc``, built alone (in a worker, after fork)."""
    svc = build_service(conf, sc)
    tables = _health_tables(conf)
    if hasattr(svc, "health_tables") and tables:
        svc.health_tables = tables
    return svc


def plan_services(conf: ServerConf) -> "list[PlannedService]":
    """The master's services: checked in full by a short-lived child (ConfigError as
    `build_services` raises it), then planned, each built by its workers after fork.

    Runs in the master at start-up and on SIGHUP; imports none of the service rooms."""
    from pyngora.server.deferred import PlannedService, check_in_child
    issues = server_issues(conf)
    if issues:
        raise ConfigError(conf.source, issues)
    from pyngora.config import pem_store
    # The certificates' bytes are read once, checked by the child (which inherits them) and,
    # once they passed, are what a worker restarted later loads (as nginx's workers use what
    # the master loaded), even if the files break before the next reload.
    pem_store.stage(lc.tls for sc in conf.services for lc in sc.listeners)
    passed = False
    try:
        check_in_child(conf, build_services)
        passed = True
    finally:
        pem_store.commit(passed)
    out: list[PlannedService] = []
    for sc in conf.services:
        svc = PlannedService(sc.name, sc, lambda sc=sc: _build_in_worker(conf, sc),
                             background=sc.type == "background")
        if sc.type == "prometheus" and svc.threads is None:
            svc.threads = 1  # as PrometheusService: one process answers scrapes
        if sc.type == "http_proxy" and _needs_prober(sc):
            prober = PlannedService(f"health-{sc.name}", None,
                                    lambda sc=sc: _prober(conf, sc), background=True)
            svc.add_dependency(prober)
            out.append(prober)
        out.append(svc)
    return out


def _second_round(e: ConfigError) -> list[ConfigIssue]:
    """For ``-t``: what building the services the file got right finds (certificates, app
    imports), beside the file's own issues, so that one run prints every error. Only when
    every issue is inside a service (top-level values feed every service); the services
    with issues are not built."""
    if e.partial is None or not all(len(i.path) >= 2 and i.path[0] == "services"
                                    for i in e.issues):
        return []
    conf, index = e.partial
    bad = {i.path[1] for i in e.issues}
    keep = [(n, sc) for n, sc in zip(index, conf.services) if n not in bad]
    if not keep:
        return []
    try:
        build_services(dataclasses.replace(conf, services=tuple(sc for _, sc in keep)),
                       [n for n, _ in keep])
    except ConfigError as more:
        return more.issues
    return []


def test_file(path: str) -> ServerConf:
    """``-t``: the file, what it names on this machine, and its services built here
    (certificates, app imports); ConfigError with every issue, in the file's order."""
    from pyngora.config.loader import load
    try:
        conf = load(path)
        issues = server_issues(conf)
        try:
            build_services(conf)
        except ConfigError as e:
            raise ConfigError(e.source, issues + e.issues) from None
        if issues:
            raise ConfigError(conf.source, issues)
        return conf
    except ConfigError as e:
        raise ConfigError(e.source, sorted(e.issues + _second_round(e),
                                           key=lambda i: i.line or 0)) from None


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m pyngora``: a Server of the YAML file's services (``-t``, ``-s`` and
    ``--version`` end in ``Server.bootstrap``)."""
    # (called with its own argv, by a wrapper or a test, this process's command line is
    # someone else's: -s upgrade starts pyngora itself)
    program = None if argv is None else [sys.executable, "-m", "pyngora"]
    server = Server(Opt.parse_args(argv), build_services=plan_services, test_file=test_file,
                    program=program)
    server.bootstrap()
    if "" in sys.path:
        # workers import the apps after fork, maybe after -d went to /: "" must still mean
        # the directory pyngora was started in
        sys.path[sys.path.index("")] = os.getcwd()
    if server.opt.conf:
        try:
            server.add_services(plan_services(server.configuration))
        except ConfigError as e:
            sys.stderr.write(f"{e}\n")
            sys.exit(1)
    server.run_forever()
