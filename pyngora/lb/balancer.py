"""`LoadBalancer`: pick a healthy backend per request. Pingora's `LoadBalancer<S>`.

A backend is usable when all of these hold:
- it is enabled and locally healthy (``set_enable``, ``set_health``, or this process's own
  health checks when the balancer runs them itself, Pingora style);
- the shared `HealthTable` (when attached: the pre-fork way, one prober for all workers) does
  not mark it unhealthy;
- this worker has not seen it fail in the last ``passive_down_seconds`` (``report_failure``,
  passive health: the next requests skip a backend that just refused a connection, before the
  prober's next round). Passive marks are hints: when they would leave no backend at all, they
  are ignored, as nginx does when every peer has failed.

``select`` runs per request: the selection arrays are built once per backend set, the health
test reads a bytearray, one mmap byte and (only while a passive mark exists) the clock.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Iterable, Optional, Union

from pyngora.lb.backend import Backend, BackendLike, Backends
from pyngora.lb.discovery import DnsDiscovery, StaticDiscovery
from pyngora.lb.health import Health, HealthCheck, HealthGroup, make_health_check, run_check
from pyngora.lb.health_table import HEADER_SIZE, UNHEALTHY, HealthTable, health_key
from pyngora.lb.selection import SELECTIONS, RoundRobin

log = logging.getLogger("pyngora.lb")

__all__ = ["LoadBalancer", "discovery_from_conf", "health_check_from_conf",
           "health_group_from_conf", "load_balancer_from_conf"]

_BAD_UNHEALTHY = 1
_BAD_DISABLED = 2
_INF = float("inf")


class LoadBalancer:
    """Backends + a selection algorithm + health.

    ``backends``: a `Backends` (with its discovery) or any iterable of ``"host:port"``,
    `Backend` or ``{"addr":..., "weight":...}``. ``selection``: `RoundRobin`, `Random`,
    `FnvHash` or `Consistent` (the class). ``health_check``: run by this process with
    ``await run_health_check()`` / ``run()``; leave it None when a `HealthService` probes for
    every worker and the table is attached with ``attach_health_table``.
    """

    def __init__(self, backends: Union[Backends, Iterable[BackendLike]],
                 selection: Callable[..., Any] = RoundRobin,
                 health_check: Optional[HealthCheck] = None, *,
                 passive_down_seconds: float = 5.0) -> None:
        self._backends = backends if isinstance(backends, Backends) else Backends(backends)
        self.selection = selection
        self.health_check = health_check
        self.passive_down_seconds = float(passive_down_seconds)
        # Pingora's knobs for running discovery and checks in this process (see `run`).
        self.health_check_frequency: Optional[float] = 5.0 if health_check else None
        self.update_frequency: Optional[float] = getattr(self._backends.discovery,
                                                         "refresh_seconds", None)
        self.parallel_health_check = True
        self._health: dict[Backend, Health] = {}
        self._configured_ext: dict[str, dict[str, Any]] = {
            b.addr: b.ext for b in self._backends.get() if b.ext}
        # Shared table (pre-fork mode).
        self._table: Optional[HealthTable] = None
        self._table_path: Optional[str] = None
        self._group: Optional[str] = None
        self._ext: Optional[dict[str, Any]] = None
        self._shm: Any = None
        self._next_sync = 0.0
        self.sync_interval = 1.0
        self._now = 0.0
        self._built_version = -1
        self._rebuild()

    @classmethod
    def try_from_iter(cls, addrs: Iterable[BackendLike],
                      selection: Callable[..., Any] = RoundRobin) -> "LoadBalancer":
        """Pingora's ``LoadBalancer::try_from_iter(["1.1.1.1:443", ...])``: raises ValueError
        on a bad address."""
        return cls(Backends(list(addrs)), selection)

    @classmethod
    def from_backends(cls, backends: Backends,
                      selection: Callable[..., Any] = RoundRobin) -> "LoadBalancer":
        return cls(backends, selection)

    # -- building ------------------------------------------------------------------------------

    def _rebuild(self) -> None:
        """Rebuild the selection arrays and per-index state for the current backend set. Runs
        when the set changes, never per request."""
        items = self._backends.get()
        # Passive marks survive a rebuild (a discovery change must not forget a dead backend).
        old = zip(getattr(self, "_items", ()), getattr(self, "_down_until", ()))
        marks = {b: t for b, t in old if t}
        self._items: tuple[Backend, ...] = items
        self._index: dict[Backend, int] = {b: i for i, b in enumerate(items)}
        self._sel = self.selection(items)
        self._health = {b: self._health.get(b) or Health() for b in items}
        self._bad = bytearray(len(items))
        for i, b in enumerate(items):
            self._refresh_bad(i, b)
        self._down_until = [marks.get(b, 0.0) for b in items]
        self._passive = bool(marks)
        self._offsets = [-1] * len(items)
        if self._table is not None and self._group is not None:
            for i, b in enumerate(items):
                slot = self._table.slot(health_key(self._group, b.addr))
                self._offsets[i] = HEADER_SIZE + slot if slot >= 0 else -1
        self._built_version = self._backends.version

    def _refresh_bad(self, i: int, b: Backend) -> None:
        h = self._health[b]
        self._bad[i] = (0 if h.healthy else _BAD_UNHEALTHY) | (0 if h.enabled else _BAD_DISABLED)

    # -- the request path ----------------------------------------------------------------------

    def _ok(self, i: int) -> bool:
        if self._bad[i]:
            return False
        off = self._offsets[i]
        if off >= 0 and self._shm[off] == UNHEALTHY:
            return False
        return not (self._passive and self._down_until[i] > self._now)

    def select(self, key: bytes = b"", max_iterations: int = 256) -> Optional[Backend]:
        """The backend for ``key`` (ignored by RoundRobin and Random), skipping unusable ones;
        None when none of the first ``max_iterations`` candidates is usable (answer 503)."""
        if self._table_path is not None or self._passive:
            now = time.monotonic()
            if self._table_path is not None and now >= self._next_sync:
                self._sync(now)
            self._now = now
        if self._built_version != self._backends.version:
            self._rebuild()
        i = self._sel.select(key, self._ok, max_iterations)
        if i < 0 and self._passive:
            self._now = _INF  # every candidate had a passive mark: those are hints, try them
            i = self._sel.select(key, self._ok, max_iterations)
        return self._items[i] if i >= 0 else None

    def select_with(self, key: bytes, max_iterations: int,
                    accept: Callable[[Backend, bool], bool]) -> Optional[Backend]:
        """Pingora's select_with: like `select`, but ``accept(backend, usable)`` decides (e.g. to
        skip the backend that just failed on a retry)."""
        if self._built_version != self._backends.version:
            self._rebuild()
        self._now = time.monotonic()
        items = self._items
        i = self._sel.select(key, lambda j: accept(items[j], self._ok(j)), max_iterations)
        return items[i] if i >= 0 else None

    def report_failure(self, backend: Backend, seconds: Optional[float] = None) -> None:
        """Passive health: ``backend`` just failed (refused, reset, timed out) in this worker;
        skip it here for ``seconds`` (default ``passive_down_seconds``)."""
        i = self._index.get(backend, -1)
        if i < 0:
            return
        self._down_until[i] = time.monotonic() + (self.passive_down_seconds
                                                  if seconds is None else seconds)
        self._passive = True

    def report_success(self, backend: Backend) -> None:
        """Passive health: ``backend`` answered; clear its mark in this worker."""
        i = self._index.get(backend, -1)
        if i < 0 or not self._passive or not self._down_until[i]:
            return
        self._down_until[i] = 0.0
        now = time.monotonic()
        self._passive = any(t > now for t in self._down_until)

    # -- health and backends -------------------------------------------------------------------

    def backends(self) -> tuple[Backend, ...]:
        """The current backends, sorted."""
        if self._table_path is not None:
            self._sync(time.monotonic())
        return self._backends.get()

    @property
    def backends_set(self) -> Backends:
        """The `Backends` object (with its discovery)."""
        return self._backends

    def set_health(self, backend: Backend, healthy: bool) -> None:
        """Mark ``backend`` healthy or not in this process (overrides until the next local
        check result)."""
        h = self._health.get(backend)
        if h is None:
            raise KeyError(f"{backend!r} is not a backend of this load balancer")
        h.healthy = bool(healthy)
        self._refresh_bad(self._index[backend], backend)

    def set_enable(self, backend: Backend, enabled: bool) -> None:
        """Take ``backend`` out of rotation (or put it back) without touching its health."""
        h = self._health.get(backend)
        if h is None:
            raise KeyError(f"{backend!r} is not a backend of this load balancer")
        h.enabled = bool(enabled)
        self._refresh_bad(self._index[backend], backend)

    set_enabled = set_enable

    def is_healthy(self, backend: Backend) -> bool:
        """Whether ``backend`` is usable now (local state, shared table, passive mark)."""
        i = self._index.get(backend, -1)
        if i < 0:
            return False
        self._now = time.monotonic()
        return self._ok(i)

    def set_health_check(self, check: Optional[HealthCheck]) -> None:
        self.health_check = check
        if check is not None and self.health_check_frequency is None:
            self.health_check_frequency = 5.0

    async def update(self) -> bool:
        """Run discovery once (Pingora's ``update``); True when the set changed."""
        changed = await self._backends.update()
        if changed:
            self._rebuild()
        return changed

    async def run_health_check(self, parallel: Optional[bool] = None) -> None:
        """Probe every backend once with ``health_check`` and apply the thresholds (in-process
        mode: a single process, or tests)."""
        check = self.health_check
        if check is None:
            return
        if self._built_version != self._backends.version:
            self._rebuild()
        pairs = [(b, self._health[b]) for b in self._items]
        if parallel if parallel is not None else self.parallel_health_check:
            await asyncio.gather(*(run_check(check, b, h) for b, h in pairs))
        else:
            for b, h in pairs:
                await run_check(check, b, h)
        for i, b in enumerate(self._items):
            if b in self._health:
                self._refresh_bad(i, b)

    async def run(self, shutdown: Any, ready: Any = None) -> None:
        """Pingora's BackgroundService for a LoadBalancer: discovery every ``update_frequency``
        and checks every ``health_check_frequency`` until ``shutdown`` (anything with
        ``wait()``/``is_set()``). ``ready`` (a callable or an object with ``notify_ready()``) is
        called after the first round.

        When a health table is attached (``attach_health_table``), the process that runs this
        becomes its writer: it publishes the backend set and every check result, so the
        workers' copies of this balancer (forked from the same object, reading the table) see
        them. That is how Pingora's ``background_service("hc", lb)`` example works pre-fork."""
        loop = asyncio.get_running_loop()
        writer = (HealthTable.create(self._table_path)
                  if self._table_path is not None and self._group is not None else None)
        next_update = next_check = loop.time()
        first = True
        try:
            while not shutdown.is_set():
                now = loop.time()
                if first or (self.update_frequency and now >= next_update):
                    await self.update()
                    next_update = now + (self.update_frequency or 0.0)
                    if writer is not None:
                        writer.set_group(self._group, self._backends.get())  # type: ignore
                if self.health_check is not None and (first or now >= next_check):
                    await self.run_health_check()
                    next_check = now + (self.health_check_frequency or 5.0)
                    if writer is not None:
                        for b in self._items:
                            writer.set(health_key(self._group, b.addr),  # type: ignore
                                       self._health[b].healthy)
                if writer is not None:
                    writer.heartbeat()
                if first and ready is not None:
                    getattr(ready, "notify_ready", ready)()
                first = False
                waits = [t for t, on in ((next_update, self.update_frequency),
                                         (next_check, self.health_check)) if on]
                delay = (min(waits) - loop.time()) if waits else 3600.0
                try:
                    await asyncio.wait_for(shutdown.wait(), max(delay, 0.01))
                except asyncio.TimeoutError:
                    pass
        finally:
            if writer is not None:
                writer.close()

    async def start(self, shutdown: Any) -> None:
        """BackgroundService entry point (``background_service("hc", lb)``)."""
        await self.run(shutdown)

    async def start_with_ready_notifier(self, shutdown: Any, ready: Any) -> None:
        """BackgroundService entry point with readiness (first round done)."""
        await self.run(shutdown, ready)

    # -- the shared table (pre-fork mode) ------------------------------------------------------

    def attach_health_table(self, table: Union[HealthTable, str], group: str,
                            ext: Optional[dict[str, Any]] = None) -> None:
        """Read health (and, when the prober publishes it, the backend set) of ``group`` from
        the shared table. ``table`` may be a path that does not exist yet: it is opened at the
        first `select` that finds it. ``ext`` is given to backends that discovery added (those
        from the configuration keep their own). Called once per worker at boot."""
        self._group = group
        self._ext = ext
        if isinstance(table, HealthTable):
            self._table_path = table.path
            self._set_table(table)
        else:
            self._table_path = table
            self._sync(time.monotonic())

    def _set_table(self, table: HealthTable) -> None:
        self._table = table
        self._shm = table.buffer
        self._follow_table()
        self._rebuild()

    def _sync(self, now: float) -> None:
        """At most once per ``sync_interval``: open the table if needed, reload its index when
        the prober published a new one, and follow its backend set."""
        self._next_sync = now + self.sync_interval
        path = self._table_path
        if self._table is None:
            try:
                table = HealthTable.open(self._table_path)  # type: ignore[arg-type]
            except (OSError, ValueError):
                return  # the prober has not created it yet: fail open meanwhile
            self._set_table(table)
            return
        if self._table.replaced():
            self.close()
            self._table_path = path
            self._sync(now)
            return
        if self._table.refresh():
            self._follow_table()
            self._rebuild()

    def _follow_table(self) -> None:
        assert self._table is not None and self._group is not None
        published = self._table.group(self._group)
        if published is None:
            return
        ext = self._ext
        self._backends.replace(
            Backend(b.addr, b.weight, self._configured_ext.get(b.addr, ext)) for b in published)

    def close(self) -> None:
        """Unmap the shared table (worker exit)."""
        if self._table is not None:
            self._table.close()
            self._table = None
            self._table_path = None
            self._shm = None
            self._offsets = [-1] * len(self._items)

    def __repr__(self) -> str:
        name = getattr(self.selection, "__name__", repr(self.selection))
        return f"LoadBalancer({name}, {len(self._items)} backends)"


# -- from the YAML configuration (duck-typed: lb does not import config) -------------------------

def _resolver_tuple(value: Optional[str]) -> Optional[tuple[str, int]]:
    if not value:
        return None
    host, sep, port = value.rpartition(":")
    if sep and port.isdigit() and (not host.count(":") or host.endswith("]")):
        return host.strip("[]"), int(port)
    return value.strip("[]"), 53


def _backend_ext(b: Any) -> dict[str, Any]:
    return {"tls": bool(getattr(b, "tls", False)), "sni": getattr(b, "sni", None),
            "verify": bool(getattr(b, "verify", True))}


def discovery_from_conf(upstream: Any) -> Union[StaticDiscovery, DnsDiscovery]:
    """``UpstreamConf`` -> StaticDiscovery or DnsDiscovery. Called at boot by the composition
    root (the prober and the workers build the same thing)."""
    d = upstream.discovery
    if getattr(d, "type", "static") == "dns":
        ext = _backend_ext(upstream.backends[0]) if upstream.backends else None
        if ext is not None and not ext["sni"]:
            ext["sni"] = d.name  # what the proxy sends to a discovered TLS backend too
        return DnsDiscovery(d.name, d.port, d.refresh_seconds, d.record,
                            _resolver_tuple(d.resolver), ext=ext)
    return StaticDiscovery(Backend(b.addr, b.weight, _backend_ext(b)) for b in upstream.backends)


def health_check_from_conf(upstream: Any, ca_file: Optional[str] = None
                           ) -> Optional[HealthCheck]:
    """``UpstreamConf.health_check`` -> a check or None (type none). An http check talks to
    each backend as the proxy does: its own ``tls``, ``sni`` and ``verify`` (the Backend's
    ``ext``), the server's ``ca_file``; ``Host`` is ``host`` when set, else the backend's sni
    or host (a DNS group's: its name)."""
    hc = upstream.health_check
    host = hc.host
    if host is None and getattr(upstream.discovery, "type", "static") == "dns":
        host = upstream.discovery.name
    return make_health_check(hc.type, path=hc.path, expect_status=hc.expect_status, host=host,
                             timeout_seconds=hc.timeout_seconds, healthy_after=hc.healthy_after,
                             unhealthy_after=hc.unhealthy_after, ca_file=ca_file)


def health_group_from_conf(upstream: Any, ca_file: Optional[str] = None) -> HealthGroup:
    """``UpstreamConf`` -> the prober's HealthGroup (discovery + check + interval)."""
    return HealthGroup(upstream.name, Backends(discovery_from_conf(upstream)),
                       health_check_from_conf(upstream, ca_file),
                       interval_seconds=upstream.health_check.interval_seconds)


def load_balancer_from_conf(upstream: Any, table_path: Optional[str]) -> LoadBalancer:
    """``UpstreamConf`` -> a worker's LoadBalancer, reading the shared table at ``table_path``
    (the prober's) when given. Selection from ``selection``; discovery is not run by the
    worker: the prober publishes the set in the table."""
    disc = discovery_from_conf(upstream)
    lb = LoadBalancer(Backends(disc), SELECTIONS[upstream.selection])
    lb.update_frequency = None
    if table_path is not None:
        lb.attach_health_table(table_path, upstream.name, ext=getattr(disc, "ext", None))
    return lb
