"""sd_notify for the master process: tell systemd what the server is doing.

A leaf: standard library only, importable by the master before any fork. Every
function is a cheap no-op that returns False when the process does not run
under systemd (no ``$NOTIFY_SOCKET``), so callers never branch on "are we under
systemd?".

Who sends what (the protocol the unit files in ``systemd/`` rely on):

- the master, once every worker accepts: ``ready(status)``;
- a master started with ``-u``, once it owns the sockets, its workers accept
  AND it has been re-parented to PID 1 (daemon double fork): ``mainpid()``,
  which sends ``MAINPID=<pid>`` and ``READY=1`` in ONE datagram;
- the master around a SIGHUP reload: ``reloading()`` before, ``ready()`` after;
- the master on SIGTERM / SIGINT: ``stopping()``;
- an old master that has handed its sockets over sends NOTHING more: with
  ``NotifyAccess=all`` any process of the unit speaks for the unit, so a
  ``STOPPING=1`` from a draining old master would stop the service;
- workers never send anything.

Socket activation (``LISTEN_FDS``) lives in ``pyngora.upgrade.transfer_fd``.
"""

from __future__ import annotations

import os
import socket
import time

__all__ = [
    "notify",
    "ready",
    "reloading",
    "stopping",
    "mainpid",
    "status",
    "watchdog_interval",
    "watchdog_ping",
    "under_systemd",
]

_NOTIFY_ENV = "NOTIFY_SOCKET"


def _address(value: str) -> str | None:
    """Turn ``$NOTIFY_SOCKET`` into an AF_UNIX address, or None if unusable.

    ``@name`` is Linux's abstract namespace (a leading NUL byte); an absolute
    path is a file-system socket. Anything else (e.g. systemd 254's
    ``vsock:CID:PORT`` for VMs) is not supported and disables notification.
    """
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def under_systemd() -> bool:
    """True when ``$NOTIFY_SOCKET`` names a usable socket (runs anytime, no I/O)."""
    value = os.environ.get(_NOTIFY_ENV, "")
    return bool(value) and _address(value) is not None


def notify(message: str) -> bool:
    """Send one sd_notify datagram (``KEY=VALUE`` lines) to systemd.

    Runs in the master whenever its state changes. Returns True if the
    datagram was handed to the kernel, False when not under systemd or when
    sending failed (systemd gone, socket full): notification is best effort
    and must never take the server down, so no exception escapes.
    """
    value = os.environ.get(_NOTIFY_ENV, "")
    if not value:
        return False
    address = _address(value)
    if address is None:
        return False
    data = message.encode("utf-8")
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    except OSError:
        return False
    try:
        # A datagram either goes whole or not at all; the kernel attaches our
        # credentials, which is how systemd knows which PID spoke.
        sock.sendto(data, address)
        return True
    except OSError:
        return False
    finally:
        sock.close()


def _with_status(lines: list[str], text: str | None) -> str:
    """Join notify lines, adding ``STATUS=text`` (one line) when given."""
    if text:
        lines.append("STATUS=" + " ".join(text.splitlines()))
    return "\n".join(lines)


def ready(status: str | None = None) -> bool:
    """``READY=1`` (plus an optional ``STATUS=``): the server now serves.

    Runs in the master after every worker accepts, at start and at the end of
    a SIGHUP reload. Returns what ``notify`` returns.
    """
    return notify(_with_status(["READY=1"], status))


def reloading(status: str | None = None) -> bool:
    """``RELOADING=1`` with ``MONOTONIC_USEC=``: a SIGHUP reload has begun.

    Runs in the master when it starts handling SIGHUP; ``ready()`` must follow
    once the new generation accepts (or once an invalid config was rejected).
    MONOTONIC_USEC is CLOCK_MONOTONIC in microseconds, which systemd >= 253
    (Type=notify-reload) uses to match the READY=1 to this reload.
    """
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(_with_status(["RELOADING=1", f"MONOTONIC_USEC={usec}"], status))


def stopping(status: str | None = None) -> bool:
    """``STOPPING=1``: the master begins a stop (SIGTERM or SIGINT).

    Never send it from an old master draining after an upgrade (see the module
    docstring). Returns what ``notify`` returns.
    """
    return notify(_with_status(["STOPPING=1"], status))


def mainpid(pid: int | None = None, *, ready: bool = True, status: str | None = None) -> bool:
    """``MAINPID=<pid>`` and, by default, ``READY=1`` in the same datagram.

    Runs in a master started with ``-u`` once it serves. It must already be a
    child of PID 1 (double fork done, ``os.getppid()`` changed): systemd treats
    a MAINPID whose parent is not systemd as "alien" and SIGKILLs it at stop
    without waiting. ``pid`` defaults to the calling process.
    """
    lines = [f"MAINPID={os.getpid() if pid is None else int(pid)}"]
    if ready:
        lines.append("READY=1")
    return notify(_with_status(lines, status))


def status(text: str) -> bool:
    """``STATUS=text``: the free-form line ``systemctl status`` shows.

    Runs in the master on changes worth a glance (workers up, generation).
    """
    return notify(_with_status([], text))


def watchdog_interval(any_pid: bool = False) -> float | None:
    """Seconds between watchdog pings, or None when no watchdog is armed.

    Reads ``$WATCHDOG_USEC`` (set by ``WatchdogSec=``) and ``$WATCHDOG_PID``.
    The answer is HALF the watchdog timeout, as sd_watchdog_enabled(3)
    advises. If ``$WATCHDOG_PID`` names another process the watchdog belongs
    to that process and the answer is None, unless ``any_pid`` is True: a
    master started by ``-s upgrade`` inherits the variables of the
    ``ExecReload=`` process, and may take the watchdog over once it is the
    main PID.
    """
    raw = os.environ.get("WATCHDOG_USEC", "")
    try:
        usec = int(raw)
    except ValueError:
        return None
    if usec <= 0:
        return None
    owner = os.environ.get("WATCHDOG_PID", "")
    if owner and not any_pid:
        try:
            if int(owner) != os.getpid():
                return None
        except ValueError:
            return None
    return usec / 2_000_000


def watchdog_ping() -> bool:
    """``WATCHDOG=1``: the master's loop is alive.

    Runs in the master every ``watchdog_interval()`` seconds, from the same
    loop that reaps workers, so a wedged master stops pinging and systemd
    restarts it. Returns what ``notify`` returns.
    """
    return notify("WATCHDOG=1")
