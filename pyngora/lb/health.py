"""Active health checks, their thresholds, and the one prober process that runs them.

Pingora's `health_check` module: `TcpHealthCheck` (connect), `HttpHealthCheck` (a GET whose
status must match), each with `consecutive_success` / `consecutive_failure` thresholds (here
`healthy_after` / `unhealthy_after`) and a health-changed callback. ``await check(backend)``
returns None when healthy and raises when not; thresholds are applied by `Health.observe`.

`HealthService` is the prober of a pre-fork server: it runs in ONE background process, owns
discovery and the checks of every upstream group, probes each backend exactly once per
interval, and publishes the result in the shared `HealthTable` that every worker reads. Health
checks use asyncio streams: this is not the request path.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import ssl
from typing import Any, Awaitable, Callable, Iterable, Optional, Sequence, Union

from pyngora.lb.backend import Backend, Backends, BackendLike
from pyngora.lb.health_table import (DEFAULT_CAPACITY, UNHEALTHY, HealthTable, health_key)
from pyngora.upstreams.dial import connected_to_itself, self_connect_error

log = logging.getLogger("pyngora.lb")

__all__ = ["HealthCheck", "TcpHealthCheck", "HttpHealthCheck", "HealthCheckError", "Health",
           "HealthGroup", "HealthService", "make_health_check", "run_check"]

ChangeCallback = Callable[[Backend, bool], Union[None, Awaitable[None]]]


class HealthCheckError(Exception):
    """A check found the backend unhealthy (other exceptions - OSError, timeouts - count too)."""


class HealthCheck:
    """Base of the checks. Thresholds: a healthy backend turns unhealthy after
    ``unhealthy_after`` consecutive failures, an unhealthy one healthy after ``healthy_after``
    consecutive successes. ``timeout`` bounds one check, connect included."""

    def __init__(self, *, timeout: float = 1.0, healthy_after: int = 1, unhealthy_after: int = 1,
                 health_changed_callback: Optional[ChangeCallback] = None) -> None:
        if healthy_after < 1 or unhealthy_after < 1:
            raise ValueError("healthy_after and unhealthy_after must be >= 1")
        self.timeout = float(timeout)
        self.healthy_after = int(healthy_after)
        self.unhealthy_after = int(unhealthy_after)
        self.health_changed_callback = health_changed_callback

    def health_threshold(self, success: bool) -> int:
        """How many consecutive results of this kind flip the state (Pingora's name)."""
        return self.healthy_after if success else self.unhealthy_after

    async def check(self, backend: Backend) -> None:  # pragma: no cover - abstract
        """Probe once: return when healthy, raise when not."""
        raise NotImplementedError

    async def _open(self, backend: Backend, tls: Optional[ssl.SSLContext] = None,
                    server_hostname: Optional[str] = None,
                    port: Optional[int] = None
                    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if backend.is_unix:
            return await asyncio.open_unix_connection(backend.host, ssl=tls,
                                                      server_hostname=server_hostname)
        reader, writer = await asyncio.open_connection(
            backend.host, port or backend.port, ssl=tls, server_hostname=server_hostname)
        if connected_to_itself(writer.transport):
            # A TCP check would call a dead backend healthy (see connected_to_itself).
            writer.transport.abort()
            raise self_connect_error()
        return reader, writer


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), 1.0)
    except (OSError, asyncio.TimeoutError, ssl.SSLError):
        pass  # the verdict is already made; a slow close changes nothing


class TcpHealthCheck(HealthCheck):
    """Healthy when a TCP (or Unix socket) connection opens within ``timeout``."""

    async def check(self, backend: Backend) -> None:
        _, writer = await self._open(backend)
        await _close(writer)

    def __repr__(self) -> str:
        return f"TcpHealthCheck(unhealthy_after={self.unhealthy_after})"


def _host_field(backend: Backend) -> str:
    """A backend's own name as a Host value: an IPv6 literal bracketed (RFC 3986 3.2.2; nginx
    answers 400 to a bare one), "localhost" for a Unix socket (a path is no host)."""
    host = backend.host
    if not host or backend.addr.startswith("unix:"):
        return "localhost"
    # A zone id's "%" is percent-encoded in a URI host (RFC 6874).
    return f"[{host.replace('%', '%25')}]" if ":" in host else host


class HttpHealthCheck(HealthCheck):
    """Healthy when ``GET path`` with ``Host: host`` answers ``expect_status``.

    ``tls`` speaks HTTPS with SNI = host (certificate verified unless ``verify=False``, against
    ``ca_file`` when given, else the system's CAs); ``port`` overrides the backend's port (a
    separate health port). A backend's own ``ext`` (``tls``, ``sni``, ``verify``: what the
    YAML says per backend) wins over these, so each is checked the way the proxy talks to it;
    with ``host`` None its Host is its ``sni`` or its host. The connection is closed after the
    status line: the body is not read.
    """

    def __init__(self, host: Optional[str], tls: bool = False, path: str = "/",
                 expect_status: int = 200, *, port: Optional[int] = None, verify: bool = True,
                 headers: Optional[dict[str, str]] = None, ca_file: Optional[str] = None,
                 **kw: Any) -> None:
        super().__init__(**kw)
        if not path.startswith("/"):
            raise ValueError(f"health check path must start with '/': {path!r}")
        self.host = host
        self.tls = tls
        self.path = path
        self.expect_status = int(expect_status)
        self.port = port
        self.verify = verify
        self.ca_file = ca_file
        self._headers = headers or {}
        self._requests: dict[str, bytes] = {}  # Host -> the request bytes
        self._contexts: dict[bool, ssl.SSLContext] = {}  # verify -> context

    def _request(self, host: str) -> bytes:
        req = self._requests.get(host)
        if req is None:
            lines = [f"GET {self.path} HTTP/1.1", f"Host: {host}",
                     "User-Agent: pyngora-health-check", "Accept: */*", "Connection: close"]
            lines += [f"{k}: {v}" for k, v in self._headers.items()]
            req = self._requests[host] = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return req

    def _context(self, verify: bool) -> ssl.SSLContext:
        ctx = self._contexts.get(verify)
        if ctx is None:
            ctx = ssl.create_default_context(cafile=self.ca_file)
            if not verify:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            ctx.set_alpn_protocols(["http/1.1"])
            self._contexts[verify] = ctx
        return ctx

    async def check(self, backend: Backend) -> None:
        ext = backend.ext or {}
        tls = ext.get("tls", self.tls)
        host = self.host or ext.get("sni") or _host_field(backend)
        # The name the proxy itself sends (HttpPeer.server_name): the backend's sni, else its
        # host; ``host`` only for a backend that says nothing of itself (the Python API).
        sni = (ext.get("sni") or backend.host) if ext else (self.host or backend.host
                                                             or "localhost")
        ctx = self._context(ext.get("verify", self.verify)) if tls else None
        reader, writer = await self._open(backend, ctx, sni if tls else None, self.port)
        try:
            writer.write(self._request(host))
            await writer.drain()
            line = await reader.readuntil(b"\r\n")
        except asyncio.IncompleteReadError as exc:
            raise HealthCheckError(f"{backend.addr}: closed before a status line") from exc
        except asyncio.LimitOverrunError as exc:
            raise HealthCheckError(f"{backend.addr}: status line too long") from exc
        finally:
            await _close(writer)
        parts = line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise HealthCheckError(f"{backend.addr}: not an HTTP/1 response: {line[:80]!r}")
        status = int(parts[1])
        if status != self.expect_status:
            raise HealthCheckError(f"{backend.addr}: status {status}, "
                                   f"expected {self.expect_status}")

    def __repr__(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"HttpHealthCheck({scheme}://{self.host}{self.path} -> {self.expect_status})"


def make_health_check(type: str, *, path: str = "/", expect_status: int = 200,
                      host: Optional[str] = None, tls: bool = False, verify: bool = True,
                      timeout_seconds: float = 1.0, healthy_after: int = 1,
                      unhealthy_after: int = 1, ca_file: Optional[str] = None
                      ) -> Optional[HealthCheck]:
    """Build a check from SPEC section 5's ``health_check`` keys (``type``: tcp | http | none).
    ``host`` defaults to "localhost" for http. Called at config load."""
    common = dict(timeout=timeout_seconds, healthy_after=healthy_after,
                  unhealthy_after=unhealthy_after)
    if type == "none":
        return None
    if type == "tcp":
        return TcpHealthCheck(**common)  # type: ignore[arg-type]
    if type == "http":
        return HttpHealthCheck(host, tls, path, expect_status, verify=verify, ca_file=ca_file,
                               **common)  # type: ignore[arg-type]
    raise ValueError(f"health_check type {type!r}: expected tcp, http or none")


class Health:
    """The threshold state of one backend (Pingora's Health). Starts healthy, as in Pingora."""

    __slots__ = ("healthy", "enabled", "_count")

    def __init__(self, healthy: bool = True) -> None:
        self.healthy = healthy
        self.enabled = True
        self._count = 0

    def observe(self, success: bool, flip_threshold: int) -> bool:
        """Record one check result; returns True when the state flipped."""
        if success == self.healthy:
            self._count = 0
            return False
        self._count += 1
        if self._count >= flip_threshold:
            self.healthy = success
            self._count = 0
            return True
        return False

    def ready(self) -> bool:
        return self.healthy and self.enabled


async def _call(cb: Callable[..., Any], *args: Any) -> None:
    try:
        res = cb(*args)
        if inspect.isawaitable(res):
            await res
    except Exception:  # a user callback must not stop the prober
        log.exception("health-changed callback %r failed", cb)


async def run_check(check: HealthCheck, backend: Backend, health: Health) -> bool:
    """Probe ``backend`` once, bounded by ``check.timeout``, feed the result to ``health`` and
    fire the check's callback on a flip. Returns True when the state flipped."""
    try:
        await asyncio.wait_for(check.check(backend), check.timeout)
        ok = True
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.debug("health check of %s failed: %r", backend.addr, exc)
        ok = False
    flipped = health.observe(ok, check.health_threshold(ok))
    if flipped:
        log.info("backend %s is now %s", backend.addr, "healthy" if ok else "unhealthy")
        if check.health_changed_callback is not None:
            await _call(check.health_changed_callback, backend, ok)
    return flipped


class HealthGroup:
    """One upstream group as the prober sees it: its backends (with their discovery), its check
    (None: publish the backends, probe nothing) and its probe interval. ``refresh_seconds``
    re-runs discovery (default: the discovery's own ``refresh_seconds``; None = once)."""

    def __init__(self, name: str, backends: Union[Backends, Iterable[BackendLike]],
                 health_check: Optional[HealthCheck] = None, interval_seconds: float = 5.0,
                 refresh_seconds: Optional[float] = None) -> None:
        if "/" in name:
            raise ValueError(f"group name {name!r} must not contain '/'")
        self.name = name
        self.backends = backends if isinstance(backends, Backends) else Backends(backends)
        self.health_check = health_check
        self.interval_seconds = float(interval_seconds)
        self.refresh_seconds = (refresh_seconds if refresh_seconds is not None
                                else getattr(self.backends.discovery, "refresh_seconds", None))


async def _sleep_or_stop(shutdown: Any, delay: float) -> bool:
    """Wait ``delay`` seconds or until shutdown; True when shutdown came first."""
    if delay <= 0:
        return shutdown.is_set()
    try:
        await asyncio.wait_for(shutdown.wait(), delay)
        return True
    except asyncio.TimeoutError:
        return False


class HealthService:
    """The prober: hosted by the server in one background process (never per worker).

    Each group runs its own loop: discovery when due, publish the backend set, probe every
    backend once (concurrently, each bounded by its timeout), write the table. Rounds start on a
    fixed cadence of ``interval_seconds``; a round that overruns delays the next one and never
    overlaps it, so each backend is probed exactly once per interval at most.
    ``probes`` counts the checks run (for tests and metrics).
    """

    def __init__(self, table_path: str, groups: Sequence[HealthGroup], *,
                 capacity: int = DEFAULT_CAPACITY,
                 on_change: Optional[Callable[[str, Backend, bool], Any]] = None) -> None:
        names = [g.name for g in groups]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate health group names in {names}")
        self.table_path = table_path
        self.groups = list(groups)
        self.capacity = capacity
        self.on_change = on_change
        self.probes = 0
        self.rounds = 0
        self.table: Optional[HealthTable] = None

    async def run(self, shutdown_event: Any, ready: Callable[[], None]) -> None:
        """Probe until ``shutdown_event`` (anything with ``wait()``/``is_set()``) is set. Calls
        ``ready()`` (or ``ready.notify_ready()``) once every group has finished its first full
        round, so a proxy that depends on this service starts with real health."""
        table = HealthTable.create(self.table_path, capacity=self.capacity)
        self.table = table
        for name in table.groups():
            if name not in {g.name for g in self.groups}:
                table.remove_group(name)  # a reload dropped it
        pending = {g.name for g in self.groups}
        notify = getattr(ready, "notify_ready", ready)

        def first_round_done(name: str) -> None:
            pending.discard(name)
            if not pending:
                notify()

        if not self.groups:
            notify()
        tasks = [asyncio.ensure_future(self._group_loop(g, table, shutdown_event,
                                                        first_round_done))
                 for g in self.groups]
        try:
            if tasks:
                await asyncio.gather(*tasks)
            else:
                await shutdown_event.wait()  # nothing to probe: still live until told to stop
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            table.close()

    async def _discovery_loop(self, group: HealthGroup, table: HealthTable,
                              shutdown: Any) -> None:
        """Re-run discovery every ``refresh_seconds`` in its own task, so a slow or dead DNS
        server never delays the probes; each change is published at once."""
        assert group.refresh_seconds is not None
        loop = asyncio.get_running_loop()
        next_refresh = loop.time()
        while True:
            next_refresh += group.refresh_seconds
            if await _sleep_or_stop(shutdown, next_refresh - loop.time()):
                return
            if await group.backends.update():
                table.set_group(group.name, group.backends.get())
            next_refresh = max(next_refresh, loop.time())  # a slow lookup: no catch-up burst

    async def _group_loop(self, group: HealthGroup, table: HealthTable, shutdown: Any,
                          first_round_done: Callable[[str], None]) -> None:
        loop = asyncio.get_running_loop()
        await group.backends.update()  # the first round probes the discovered set
        refresher = (asyncio.ensure_future(self._discovery_loop(group, table, shutdown))
                     if group.refresh_seconds else None)
        health: dict[Backend, Health] = {}
        next_round = loop.time()
        first = True
        try:
            while not shutdown.is_set():
                backends = group.backends.get()
                table.set_group(group.name, backends)
                # Threshold state survives a prober restart: start from what the table says.
                health = {b: health.get(b) or Health(
                    table.state(health_key(group.name, b.addr)) != UNHEALTHY) for b in backends}
                check = group.health_check
                if check is not None and backends:
                    await asyncio.gather(*(self._probe(group, table, check, b, health[b])
                                           for b in backends))
                    self.rounds += 1
                table.heartbeat()
                if first:
                    first = False
                    first_round_done(group.name)
                next_round += group.interval_seconds
                now = loop.time()
                if next_round < now:
                    next_round = now  # overran: start the next round now, skip missed ones
                if await _sleep_or_stop(shutdown, next_round - now):
                    return
        finally:
            if refresher is not None:
                refresher.cancel()
                await asyncio.gather(refresher, return_exceptions=True)

    async def _probe(self, group: HealthGroup, table: HealthTable, check: HealthCheck,
                     backend: Backend, health: Health) -> None:
        self.probes += 1
        flipped = await run_check(check, backend, health)
        key = health_key(group.name, backend.addr)
        # Written every round, not only on flips: a fresh table (or one another prober left)
        # converges within one interval.
        table.set(key, health.healthy)
        if flipped and self.on_change is not None:
            await _call(self.on_change, group.name, backend, health.healthy)
