"""A worker process: one uvloop event loop serving one service's sockets.

Built in the master before fork (`WorkerSpec`), run in the child by `run_worker`, which always
ends in ``os._exit``. A worker tells the master it accepts by writing ``R`` on its ready pipe,
drains on SIGTERM/SIGQUIT (or when its master is gone), closes at once on SIGINT.
"""
from __future__ import annotations

import os
import resource
import signal
import socket
import sys
import traceback
from typing import TYPE_CHECKING, Any, Optional

from pyngora import log
from pyngora.config.schema import ListenerConf, ServerConf

if TYPE_CHECKING:  # pragma: no cover
    from pyngora.services.base import Service, WorkerContext

# Imported by the master: the service rooms (and asyncio with them) are imported in the
# worker, after fork (`_serve`), so the master stays small.

EXIT_OK = 0
EXIT_BOOT_FAILED = 4     # the worker never became ready (bad app, import error, ...)
EXIT_CRASHED = 5
EXIT_FINISHED = 6        # a background service's start() returned on its own: its work is done


class WorkerSpec:
    """Everything one worker needs, prepared in the master."""

    __slots__ = ("service", "slot", "generation", "conf", "sockets", "title", "ready_fd",
                 "master_pid", "sharers")

    def __init__(self, service: "Service | Any", slot: int, generation: int, conf: ServerConf,
                 sockets: list[tuple[ListenerConf, socket.socket]], title: str,
                 sharers: int = 1) -> None:
        self.service = service
        self.slot = slot
        self.generation = generation
        self.conf = conf
        self.sockets = sockets
        self.title = title
        self.sharers = sharers  # workers accepting from each of these sockets (work stealing)
        self.ready_fd = -1
        self.master_pid = os.getpid()


# pyngora's own modules that code imports inside functions (to keep one-way doors or the
# master small), loaded with the service's room: parent -> what it imports on first use.
_LAZY_OWN = {"pyngora.services.http_service": ("pyngora.services.h2_dispatch",
                                               "pyngora.protocols.tls"),
             "pyngora.protocols.h1": ("pyngora.protocols.h1_response",),
             "pyngora.proxy": ("pyngora.proxy.declarative",),
             "pyngora.upstreams": ("pyngora.upstreams.connector",),
             "pyngora.lb.backend": ("pyngora.lb.discovery",),
             "pyngora.metrics.service": ("pyngora.metrics.exporter", "pyngora.lb.health_table")}


def _preload_modules() -> None:
    """Import what the request path may import lazily, while the files are still readable:
    after the drop to ``user`` they may not be (a Python under /root, a checkout only root
    may read). Runs after the service was built (its room is loaded), before the drop."""
    import importlib
    names = ["concurrent.futures.thread", "ssl", "json", "email.utils", "zlib", "gzip",
             "hashlib", "hmac", "base64", "urllib.parse", "ipaddress", "encodings.idna",
             "h2.connection"]
    for parent, children in _LAZY_OWN.items():
        if parent in sys.modules:
            names.extend(children)
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:
            pass


def worker_ids(conf: ServerConf) -> Optional[tuple[Optional[int], Optional[int]]]:
    """(uid, gid) the workers drop to (None in either: unchanged), or None when they keep
    the master's (not root, or no ``user``/``group``). KeyError for an unknown name."""
    if os.getuid() != 0 or not (conf.user or conf.group):
        return None
    import grp
    import pwd
    gid = grp.getgrnam(conf.group).gr_gid if conf.group else None
    uid = None
    if conf.user:
        pw = pwd.getpwnam(conf.user)
        uid = pw.pw_uid
        if gid is None:
            gid = pw.pw_gid
    return uid, gid


def _drop_privileges(conf: ServerConf) -> None:
    """Workers run as ``user``/``group`` (the master keeps its rights to bind on reload)."""
    ids = worker_ids(conf)
    if ids is None:
        return
    uid, gid = ids
    os.setgroups([])
    if gid is not None:
        os.setgid(gid)
    if uid is not None:
        os.setuid(uid)


def run_worker(spec: WorkerSpec, keep_fds: set[int]) -> None:
    """The child's whole life. Never returns."""
    code = EXIT_CRASHED
    try:
        code = _serve(spec, keep_fds)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else EXIT_CRASHED
    except BaseException:  # noqa: BLE001 - a worker must report, never unwind into the master
        try:
            log.ERROR.error("worker %s crashed:\n%s", spec.title, traceback.format_exc())
        except Exception:
            pass
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:
            pass
        os._exit(code)


# SIGUSR1 (log reopen) that came while the worker was booting, before its loop's handler.
_REOPEN_MISSED: list[int] = []


def _serve(spec: WorkerSpec, keep_fds: set[int]) -> int:
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    # The master signals every worker, booting or not: SIGHUP and SIGUSR1 must not kill one
    # before _main handles them (their default action is to terminate). A reopen asked for
    # meanwhile is done once the loop runs.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, lambda _sig, _frame: _REOPEN_MISSED.append(1))
    signal.set_wakeup_fd(-1)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    _close_foreign_fds(keep_fds)
    try:
        import setproctitle
        setproctitle.setproctitle(spec.title)
    except Exception:
        pass
    _set_parent_death_signal()
    conf = spec.conf
    log.setup(None if not conf.error_log else conf.error_log, conf.log_level, conf.access_log)
    try:
        # a YAML service is planned in the master and built here (server/deferred.py)
        from pyngora.server.deferred import realize
        spec.service = realize(spec.service)
    except Exception:
        log.ERROR.error("worker %s failed to boot:\n%s", spec.title, traceback.format_exc())
        return EXIT_BOOT_FAILED

    import asyncio
    import uvloop
    from pyngora.services.base import WorkerContext
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    ctx = WorkerContext(spec.service, spec.slot, spec.generation, conf, loop)
    try:
        return loop.run_until_complete(_main(spec, ctx))
    finally:
        try:
            loop.close()
        except Exception:
            pass


async def _main(spec: WorkerSpec, ctx: "WorkerContext") -> int:
    import asyncio
    from pyngora.server.accepting import AcceptHandles, FdGuard, keep_adjusting
    from pyngora.services.base import ReadyNotifier
    loop = asyncio.get_running_loop()
    service = spec.service
    conf = spec.conf
    servers: list[AcceptHandles] = []

    def ready() -> None:
        try:
            os.write(spec.ready_fd, b"R")
        except OSError:
            pass

    def on_term() -> None:
        ctx.shutdown.set()

    def on_int() -> None:
        ctx.shutdown.set(fast=True)

    loop.add_signal_handler(signal.SIGTERM, on_term)
    loop.add_signal_handler(signal.SIGQUIT, on_term)
    loop.add_signal_handler(signal.SIGINT, on_int)
    loop.add_signal_handler(signal.SIGUSR1, log.reopen)
    loop.add_signal_handler(signal.SIGHUP, lambda: None)
    if _REOPEN_MISSED:
        _REOPEN_MISSED.clear()
        log.reopen()
    watch = loop.create_task(_watch_master(spec.master_pid, ctx))
    metrics = _start_metrics(service.name, ctx, loop, http=not service.is_background)

    try:
        if service.is_background:
            _preload_modules()
            _drop_privileges(conf)
            task = loop.create_task(service.start_with_ready_notifier(  # type: ignore[attr-defined]
                ctx.shutdown, ReadyNotifier(ready)))
            done, _ = await asyncio.wait({task, loop.create_task(ctx.shutdown.wait())},
                                         return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                task.result()  # surface a crash
                # Returned on its own: done (see EXIT_FINISHED); returned because we asked it
                # to stop: a plain exit, restarted unless the master stops it on purpose.
                return EXIT_OK if ctx.shutdown.is_set() else EXIT_FINISHED
            if ctx.shutdown.fast:
                task.cancel()
                return EXIT_OK
            try:
                await asyncio.wait_for(task, conf.grace_period_seconds)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                pass
            return EXIT_OK
        try:
            await service.start_worker(ctx)
            _preload_modules()
            # Certificates and keys are read before the drop, as nginx's master reads them:
            # a key is usually readable by root only (/etc/ssl/private, /etc/letsencrypt).
            ssl_ctxs = [getattr(service, "ssl_context", lambda l: None)(listener)
                        for listener, _ in spec.sockets]
            for tls_ctx in ssl_ctxs:
                if hasattr(tls_ctx, "service_metrics"):  # (protocols.tls.ListenerContext)
                    # its 400s to plain HTTP count with the service's other requests
                    tls_ctx.service_metrics = ctx.state.get("service_metrics")
            _drop_privileges(conf)
            for (listener, sock), ssl_ctx in zip(spec.sockets, ssl_ctxs):
                factory = service.protocol_factory(ctx, listener)
                handles = AcceptHandles(loop, sock, factory, listener.backlog, ssl_ctx,
                                        spec.sharers, _handshake_timeout(service))
                await handles.open(sock)
                servers.append(handles)
            sampler = loop.create_task(keep_adjusting(servers))
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            if servers and 0 < soft < 1 << 30:  # (not RLIM_INFINITY)
                FdGuard(loop, servers, soft, ctx.connections)
        except Exception:
            log.ERROR.error("worker %s failed to boot:\n%s", spec.title, traceback.format_exc())
            return EXIT_BOOT_FAILED
        ready()
        await ctx.shutdown.wait()
        # Drain: stop accepting, take what is already queued, let in-flight requests finish.
        # (The sampler is stopped first: uvloop's create_server(sock=) does not yield, so it
        # is between samples and no handle is half made.)
        sampler.cancel()
        try:
            await sampler
        except asyncio.CancelledError:
            pass
        queued: list[Any] = []
        for handles in servers:
            handles.close()
            if ctx.shutdown.fast:
                handles.own.close()
            else:
                # Started now, so the connections reach the loop even with a grace period of
                # 0 (then cancelled: uvloop closes them rather than leave them to the GC).
                queued.append(loop.create_task(serve_queued(
                    loop, take_queued(handles.own), handles.factory, handles.ssl,
                    handles.handshake_timeout)))
        if ctx.shutdown.fast:
            ctx.connections.abort_all()
        else:
            ctx.connections.drain()
            try:
                # The queued connections first (a TLS one joins the others once its handshake
                # is done), then every connection's last response, all within the grace period.
                await asyncio.wait_for(_drained(queued, ctx.connections),
                                       conf.grace_period_seconds)
            except asyncio.TimeoutError:
                log.ERROR.warning("worker %s: %d connections still open after the grace period",
                                  spec.title, len(ctx.connections))
                ctx.connections.abort_all()
        try:
            await asyncio.wait_for(service.stop_worker(ctx), conf.graceful_shutdown_timeout_seconds)
        except Exception:
            pass
        return EXIT_OK
    finally:
        watch.cancel()
        if metrics is not None:
            try:
                metrics.close()  # the last counts reach the files before os._exit
            except Exception:
                pass


def _start_metrics(service: str, ctx: "WorkerContext", loop: object,
                   http: bool = True) -> Optional[object]:
    """Per-worker metrics: plain counters flushed to the multiprocess files every second.
    ``http``: the service serves requests, so its request series start at zero (a background
    service, such as a health prober, has none). Metrics must never stop a worker, so any
    failure here only logs."""
    if os.environ.get("PYNGORA_METRICS") == "off":  # the benchmark's metrics-off arm
        return None
    try:
        from pyngora.metrics import registry
        registry.init_worker(service if http else None)
        if http:
            ctx.state["service_metrics"] = registry.service_metrics(service)
        registry.start_flusher(loop, on_error=lambda e: log.ERROR.warning(
            "metrics flush failed: %s", e))
        return registry
    except Exception as e:
        log.ERROR.warning("metrics off in %s: %s", service, e)
        return None


async def _drained(queued: list[Any], connections: Any) -> None:
    import asyncio
    await asyncio.gather(*queued)
    await connections.wait_empty()


def take_queued(sock: socket.socket) -> list[socket.socket]:
    """Accept what is already queued on a listening socket, then close it: a listener that a
    reload or an upgrade removes is closed once its old workers drained, and a connection
    still in its queue then would be reset. Returns the accepted sockets, for serve_queued."""
    taken: list[socket.socket] = []
    try:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:  # BlockingIOError: the queue is empty
                break
            conn.setblocking(False)
            taken.append(conn)
    finally:
        sock.close()
    return taken


def _handshake_timeout(service: object) -> Optional[float]:
    """How long a TLS client of ``service`` may take over its handshake: the service's
    ``limits.header_read_timeout_seconds``; None (uvloop's 60 s) for a service without, or
    with 0 (no header timeout there, and uvloop refuses 0: every handshake would fail)."""
    t = getattr(getattr(service, "limits", None), "header_read_timeout_seconds", None)
    return t if t and t > 0 else None


async def serve_queued(loop: object, conns: list[socket.socket], factory: object,
                       ssl_ctx: object, handshake_timeout: Optional[float] = None) -> None:
    """Hand ``conns`` (from take_queued) to the loop, served like any other connection (they
    get ``Connection: close``: the worker is draining). TLS handshakes run side by side, so a
    client that never sends its ClientHello holds only its own connection (up to the handshake
    timeout), not the ones queued behind it."""
    import asyncio

    async def serve(conn: socket.socket) -> None:
        try:
            await loop.connect_accepted_socket(  # type: ignore[attr-defined]
                factory, conn, ssl=ssl_ctx,
                ssl_handshake_timeout=handshake_timeout if ssl_ctx is not None else None)
        except Exception:
            conn.close()
    if conns:
        await asyncio.gather(*(serve(conn) for conn in conns))


async def _watch_master(master_pid: int, ctx: "WorkerContext") -> None:
    """A worker outlives no master: once re-parented, it drains and exits."""
    import asyncio
    while not ctx.shutdown.is_set():
        await asyncio.sleep(1.0)
        if os.getppid() != master_pid:
            log.ERROR.warning("master %d is gone; worker draining", master_pid)
            ctx.shutdown.set()
            return


def _set_parent_death_signal() -> None:
    """Linux: SIGTERM this worker when its master dies (the 1 s watch covers the rest)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _close_foreign_fds(keep: set[int]) -> None:
    """Close the master's other listening sockets and pipes inherited across fork, so a dropped
    listener or another generation's pipe lives only where it belongs."""
    try:
        fds = [int(x) for x in os.listdir("/proc/self/fd")]
    except OSError:
        return
    for fd in fds:
        if fd > 2 and fd not in keep:
            try:
                if os.path.islink(f"/proc/self/fd/{fd}"):
                    target = os.readlink(f"/proc/self/fd/{fd}")
                    if target.startswith(("socket:", "pipe:")):
                        os.close(fd)
            except OSError:
                pass
