"""Services the master plans but never builds: the worker builds them after fork.

Building a YAML service imports its room (the proxy engine, h2, ssl, asyncio, the user's app),
about 10 MiB of a master that needs none of it. So the master holds a `PlannedService` per
service (name, listeners, threads, dependencies: all it reads) and each worker calls
``realize()`` after fork. The configuration is still checked in full before any worker
starts: `check_in_child` runs the real build in a short-lived child and brings back its
issues, so a bad app or certificate still fails ``pyngora -c`` (exit 1) and a bad SIGHUP
reload is still refused, with the same ``file:line: key: message`` text.
"""
from __future__ import annotations

import marshal
import os
import select
import signal
import time
import traceback
from typing import TYPE_CHECKING, Any, Callable, Optional

from pyngora.config.schema import ConfigError, ConfigIssue, ListenerConf, ServerConf, ServiceConf

if TYPE_CHECKING:  # pragma: no cover
    from pyngora.services.base import Service

# How long the master waits on the check child (an app whose import hangs must not hang a
# reload forever).
CHECK_TIMEOUT = 120.0


class PlannedService:
    """The master's stand-in for one service: what the master reads of a Service, and a
    ``build`` callable that a worker runs after fork to get the real one."""

    kind = "planned"

    def __init__(self, name: str, conf: Optional[ServiceConf], build: Callable[[], "Service"],
                 *, background: bool) -> None:
        self.name = name
        self.conf = conf
        self.is_background = background
        # the same defaults as Service.__init__ / BackgroundService.__init__
        self.threads: Optional[int] = 1 if background else (conf.threads if conf else None)
        self.work_stealing: Optional[bool] = None if background or conf is None \
            else conf.work_stealing
        self.listeners: list[ListenerConf] = [] if background or conf is None \
            else list(conf.listeners)
        self.dependencies: list[Any] = []
        self._build = build

    def add_dependency(self, other: Any) -> None:
        self.dependencies.append(other)

    def realize(self) -> "Service":
        """Runs in the worker, after fork: build the real service and check that it is the
        one the master bound sockets for (a mismatch is a bug, and fails the boot loudly)."""
        svc = self._build()
        if svc.name != self.name or bool(svc.is_background) != self.is_background or \
                list(svc.listeners) != self.listeners:
            raise RuntimeError(f"service {self.name!r}: the built service does not match the "
                               f"master's plan (name {svc.name!r}, "
                               f"{len(svc.listeners)} listeners)")
        return svc

    def __repr__(self) -> str:
        return f"<PlannedService {self.name!r}>"


def realize(service: Any) -> "Service":
    """In a worker: the real service for what the master handed over (planned or not)."""
    build = getattr(service, "realize", None)
    return build() if build is not None else service


def check_in_child(conf: ServerConf, build_services: Callable[[ServerConf], list[Any]],
                   timeout: float = CHECK_TIMEOUT) -> None:
    """Run ``build_services(conf)`` in a forked child, so its imports stay out of this
    process. Returns when it succeeds; raises ConfigError with the child's issues otherwise.

    Runs in the master (at start-up and on SIGHUP, in the loop's thread, blocking it as the
    in-process build did). The child is waited for here, before the master reaps again."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the check child: never returns
        code = 0
        try:
            os.close(rfd)
            _quiet_signals()
            try:
                build_services(conf)
                payload: Any = None
            except ConfigError as e:
                payload = [(tuple(i.path), str(i.message), i.line) for i in e.issues]
            except BaseException as e:  # noqa: BLE001 - everything goes back to the master
                payload = [((), f"{type(e).__name__}: {e}", None)]
            data = marshal.dumps(payload)
            view = memoryview(data)
            while view:
                view = view[os.write(wfd, view):]
        except BaseException:  # noqa: BLE001
            traceback.print_exc()
            code = 1
        os._exit(code)
    os.close(wfd)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                raise ConfigError(conf.source, [ConfigIssue(
                    (), f"checking the services took longer than {timeout:g}s (an app whose "
                        f"import hangs?)")])
            try:
                ready, _, _ = select.select([rfd], [], [], min(left, 1.0))
            except InterruptedError:
                continue
            if not ready:
                continue
            chunk = os.read(rfd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(rfd)
        _wait(pid)
    data = b"".join(chunks)
    if not data:
        raise ConfigError(conf.source, [ConfigIssue(
            (), "the configuration check process died (see the error output above)")])
    issues = marshal.loads(data)
    if issues:
        raise ConfigError(conf.source, [ConfigIssue(p, m, ln) for p, m, ln in issues])


def _quiet_signals() -> None:
    """The check child must not act on, or wake, the master's signal machinery."""
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:
        pass
    for sig in (signal.SIGTERM, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _wait(pid: int) -> None:
    while True:
        try:
            os.waitpid(pid, 0)
            return
        except InterruptedError:
            continue
        except ChildProcessError:
            return
