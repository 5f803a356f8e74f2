"""Services: what a worker process runs, and the small contract between a service and the worker.

A `Service` built from Python (the `Server` API) is built in the master and carried across
`fork`; one from YAML is only planned in the master (pyngora/server/deferred.py: checked in a
short-lived child, then built by each worker after fork, so the master imports none of this).
Either way it is started in each of its worker processes. Listening services hand the worker an asyncio protocol factory
per listener; background services run one coroutine in a process of their own.
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, Protocol

from pyngora import log
from pyngora.config.schema import ListenerConf, ServerConf, ServiceConf, TlsConf, parse_address

if TYPE_CHECKING:  # pragma: no cover
    pass


class ShutdownWatch:
    """Tells a service when to stop: ``await shutdown`` (or ``await shutdown.wait()``) returns once
    the worker starts draining; ``shutdown.is_set()`` polls. Pingora's ShutdownWatch."""

    __slots__ = ("_event", "fast")

    def __init__(self) -> None:
        self._event: Optional[asyncio.Event] = None
        self.fast = False

    def _ev(self) -> asyncio.Event:
        if self._event is None:
            self._event = asyncio.Event()
        return self._event

    def is_set(self) -> bool:
        return self._event is not None and self._event.is_set()

    async def wait(self) -> None:
        await self._ev().wait()

    def __await__(self):  # type: ignore[no-untyped-def]
        return self.wait().__await__()

    def set(self, fast: bool = False) -> None:
        """Called by the worker when it starts draining (fast=True on SIGINT)."""
        self.fast = self.fast or fast
        self._ev().set()


class TrackedConnection(Protocol):
    """What a downstream connection offers the worker for draining."""

    def close_when_idle(self) -> None:
        """Drain: close now if no request is in flight, else right after the current response
        (HTTP/1 sends ``Connection: close`` on it; HTTP/2 sends GOAWAY)."""

    def abort(self) -> None:
        """Fast stop: close the transport now."""


class ConnectionTracker:
    """The live downstream connections of one worker, so draining can wait for them."""

    __slots__ = ("_conns", "_empty", "draining", "on_count", "count_from")

    def __init__(self) -> None:
        self._conns: set[TrackedConnection] = set()
        self._empty: Optional[asyncio.Event] = None
        self.draining = False
        # Told the number of connections after each change once there are ``count_from`` or
        # more (the worker's descriptor guard; below that, a change costs one comparison).
        self.on_count: Optional[Callable[[int], None]] = None
        self.count_from = 1 << 62

    def add(self, conn: TrackedConnection) -> None:
        conns = self._conns
        conns.add(conn)
        if self.draining:
            conn.close_when_idle()
        if len(conns) >= self.count_from:
            self.on_count(len(conns))  # type: ignore[misc]

    def discard(self, conn: TrackedConnection) -> None:
        conns = self._conns
        conns.discard(conn)
        if not conns and self._empty is not None:
            self._empty.set()
        if len(conns) >= self.count_from:
            self.on_count(len(conns))  # type: ignore[misc]

    def __len__(self) -> int:
        return len(self._conns)

    def drain(self) -> None:
        """Ask every connection to close once idle; new ones are told at once."""
        self.draining = True
        for conn in list(self._conns):
            conn.close_when_idle()

    def abort_all(self) -> None:
        for conn in list(self._conns):
            conn.abort()

    async def wait_empty(self) -> None:
        if not self._conns:
            return
        self._empty = asyncio.Event()
        await self._empty.wait()


class RefusedRequest:
    """A request a connection answered itself, before its app saw it (a malformed head, a
    408, an HTTP/2 stream refused for its headers): what an access line can say of it.
    Made only on that path, only while the access log is on, and handed to the app's
    ``log_refused`` (see :func:`report_refused`). ``line``: the request line as far as it
    was read (None: nothing of it); ``protocol``: "HTTP/2" on HTTP/2, else None (the line
    tells); ``duration``: seconds since the request began, as far as known (else 0.0)."""

    __slots__ = ("client_addr", "line", "protocol", "status", "duration", "reason")

    def __init__(self, client_addr: Any, line: Optional[bytes], protocol: Optional[str],
                 status: int, duration: float, reason: str) -> None:
        self.client_addr = client_addr
        self.line = line
        self.protocol = protocol
        self.status = status
        self.duration = duration
        self.reason = reason


def report_refused(app: Any, refused: Optional[RefusedRequest]) -> None:
    """Hand ``refused`` to ``app.log_refused`` when the app has one (the proxy engine writes
    an access line with it; others log nothing, as for their other requests). Called when
    the refusal is sent; never raises: the connection goes on closing whatever the log does."""
    hook = getattr(app, "log_refused", None)
    if hook is None or refused is None:
        return
    try:
        hook(refused)
    except Exception as e:  # (a full disk, say) the answer is out already
        log.ERROR.error("access line of a refused request failed: %r", e)


class WorkerContext:
    """Everything a service needs inside one worker process."""

    __slots__ = ("service", "slot", "generation", "server_conf", "shutdown", "connections",
                 "loop", "state")

    def __init__(self, service: "Service", slot: int, generation: int, server_conf: ServerConf,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.service = service
        self.slot = slot
        self.generation = generation
        self.server_conf = server_conf
        self.shutdown = ShutdownWatch()
        self.connections = ConnectionTracker()
        self.loop = loop
        self.state: dict[str, Any] = {}  # per-worker objects a service builds in start_worker


class Service:
    """A named unit of work with listeners; Pingora's Service.

    ``threads`` overrides the server's worker count for this service (None = server default);
    ``work_stealing`` likewise.
    """

    kind = "service"
    is_background = False

    def __init__(self, name: str, conf: Optional[ServiceConf] = None) -> None:
        self.name = name
        self.conf = conf
        self.threads: Optional[int] = conf.threads if conf else None
        self.work_stealing: Optional[bool] = conf.work_stealing if conf else None
        self.listeners: list[ListenerConf] = list(conf.listeners) if conf else []
        self.dependencies: list[Service] = []

    # -- listeners, as Pingora's ListeningService ------------------------------------------
    def add_tcp(self, addr: str, backlog: int = 1024) -> None:
        self.listeners.append(parse_address(addr, backlog=backlog))

    def add_uds(self, path: str, mode: Optional[int] = None, backlog: int = 1024) -> None:
        self.listeners.append(parse_address("unix:" + path, mode=mode, backlog=backlog))

    def add_tls(self, addr: str, cert: str, key: str, backlog: int = 1024) -> None:
        self.listeners.append(parse_address(addr, backlog=backlog,
                                            tls=TlsConf(cert=cert, key=key)))

    def add_dependency(self, other: "Service") -> None:
        """This service's workers start accepting only once ``other`` reports ready."""
        self.dependencies.append(other)

    # -- run inside each worker process ------------------------------------------------------
    async def start_worker(self, ctx: WorkerContext) -> None:
        """Runs in each worker after fork, before it accepts: build pools, load balancers."""

    def protocol_factory(self, ctx: WorkerContext,
                         listener: ListenerConf) -> Callable[[], asyncio.BaseProtocol]:
        """The asyncio protocol factory for connections accepted on ``listener``."""
        raise NotImplementedError(f"service {self.name!r} has listeners but no protocol")

    async def stop_worker(self, ctx: WorkerContext) -> None:
        """Runs in each worker once its connections are drained (or the grace period ran out)."""


class ReadyNotifier:
    """Handed to ``start_with_ready_notifier``: ``notify_ready()`` once the first cycle is done."""

    __slots__ = ("_callback", "_done")

    def __init__(self, callback: Callable[[], None]) -> None:
        self._callback = callback
        self._done = False

    def notify_ready(self) -> None:
        if not self._done:
            self._done = True
            self._callback()


class BackgroundService(Service):
    """A service with no listeners that runs one coroutine in a process of its own.

    Subclasses implement ``start(shutdown)``, or ``start_with_ready_notifier(shutdown, ready)``
    when dependants must wait for their first cycle (a health checker before a proxy).
    """

    kind = "background"
    is_background = True

    def __init__(self, name: str = "background", conf: Optional[ServiceConf] = None) -> None:
        super().__init__(name, conf)
        self.threads = 1

    async def start(self, shutdown: ShutdownWatch) -> None:
        raise NotImplementedError

    async def start_with_ready_notifier(self, shutdown: ShutdownWatch,
                                        ready: ReadyNotifier) -> None:
        """Default: ready at once, then ``start``."""
        ready.notify_ready()
        await self.start(shutdown)


def background_service(name: str, task: Any) -> BackgroundService:
    """Pingora's background_service(name, task): wraps an object with ``start``/``start_with_ready_notifier``
    (or a BackgroundService already) into a service."""
    if isinstance(task, BackgroundService):
        task.name = name
        return task
    if not (callable(getattr(task, "start", None))
            or callable(getattr(task, "start_with_ready_notifier", None))):
        # found when the service is built (-t, a reload), not as a traceback in every worker
        raise TypeError(f"{type(task).__name__} is no background service: it has neither "
                        f"start(shutdown) nor start_with_ready_notifier(shutdown, ready)")
    svc = _WrappedBackground(name, task)
    return svc


class _WrappedBackground(BackgroundService):
    def __init__(self, name: str, task: Any) -> None:
        super().__init__(name)
        self.task = task

    async def start(self, shutdown: ShutdownWatch) -> None:
        await self.task.start(shutdown)

    async def start_with_ready_notifier(self, shutdown: ShutdownWatch,
                                        ready: ReadyNotifier) -> None:
        if hasattr(self.task, "start_with_ready_notifier"):
            await self.task.start_with_ready_notifier(shutdown, ready)
        else:
            ready.notify_ready()
            await self.task.start(shutdown)


def iter_services(items: Iterable[Service]) -> list[Service]:
    return list(items)
