"""Binding, adopting and keying the master's listening sockets.

Every socket has a key ``service/address/slot``: slot ``*`` for a socket that all workers of a
work-stealing service share, ``N`` for the SO_REUSEPORT socket of pinned worker slot N. The key
is what the upgrade manifest carries, so pinned sockets of one address never collide.
"""
from __future__ import annotations

import errno
import os
import socket
import stat
from typing import Iterable, Optional

from pyngora.config.schema import ListenerConf


class BindError(Exception):
    """A listener could not be bound; the message names the service and the address."""


def socket_key(service: str, listener: ListenerConf, slot: Optional[int]) -> str:
    return f"{service}/{listener.key}/{'*' if slot is None else slot}"


def _unlink_stale_unix(path: str) -> None:
    """Remove a socket file nobody listens on (left by a crash); refuse to steal a live one."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise BindError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return
    except OSError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise BindError(f"{path}: another process is listening on it")


def _check_port_free(service: str, listener: ListenerConf) -> None:
    """Before the first SO_REUSEPORT socket of an address this master does not hold yet: a
    plain bind must succeed. The kernel lets a process of the same user join another one's
    SO_REUSEPORT group without a word, so a second pyngora with pinned workers on the same
    port would otherwise start and take half of the first one's connections. BindError
    ("address already in use") when someone listens there; returns None otherwise."""
    if listener.socket_family == socket.AF_UNIX or not listener.port:
        return  # (port 0: every slot gets a port of its own anyway)
    probe = socket.socket(listener.socket_family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no owner
        if listener.socket_family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        probe.bind((listener.host, listener.port))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise BindError(f"cannot listen on {listener.address} for service {service!r}: "
                            f"address already in use (another process listens on it)") \
                from None
        # anything else (no such address, ...) is for bind_listener to report
    finally:
        probe.close()


def bind_listener(service: str, listener: ListenerConf, reuse_port: bool) -> socket.socket:
    """Create, bind and listen one non-blocking socket for ``listener``."""
    family = listener.socket_family
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family == socket.AF_UNIX:
            _unlink_stale_unix(listener.path)
            sock.bind(listener.path)
            if listener.mode is not None:
                os.chmod(listener.path, listener.mode)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((listener.host, listener.port))
        sock.listen(listener.backlog)
        sock.setblocking(False)
        return sock
    except BindError:
        sock.close()
        raise
    except (OverflowError, ValueError, TypeError) as e:
        sock.close()
        raise BindError(f"cannot listen on {listener.address} for service {service!r}: {e}") \
            from None
    except OSError as e:
        sock.close()
        why = "address already in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
        raise BindError(f"cannot listen on {listener.address} for service {service!r}: {why}") \
            from None


def socket_address_key(sock: socket.socket) -> str:
    """The ``address`` part of a key for an inherited socket (systemd's LISTEN_FDS)."""
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return "unix:" + (name.decode() if isinstance(name, bytes) else name)
    if sock.family == socket.AF_INET6:
        return f"[{name[0]}]:{name[1]}"
    return f"{name[0]}:{name[1]}"


class SocketTable:
    """The master's listening sockets by key. Adopted sockets (upgrade, systemd) are used first."""

    def __init__(self) -> None:
        self.sockets: dict[str, socket.socket] = {}
        # systemd LISTEN_FDS sockets, by address only: any service/slot may claim them
        self.by_address: dict[str, list[socket.socket]] = {}

    def adopt(self, sockets: dict[str, socket.socket]) -> None:
        self.sockets.update(sockets)

    def adopt_by_address(self, sockets: Iterable[socket.socket]) -> None:
        for s in sockets:
            s.setblocking(False)
            self.by_address.setdefault(socket_address_key(s), []).append(s)

    def ensure(self, service: str, listener: ListenerConf, slot: Optional[int]) -> socket.socket:
        """The socket for this key: kept, adopted, or bound now."""
        key = socket_key(service, listener, slot)
        sock = self.sockets.get(key)
        if sock is not None:
            return sock
        spare = self.by_address.get(listener.key)
        if spare:
            sock = spare.pop(0)
        else:
            sock = self._held_for(listener, slot)
            if sock is None:
                sock = self._other_mode(listener, slot)
            if sock is None:
                if slot is not None and not self._held_at(listener) \
                        and not self._holds_port(listener):
                    _check_port_free(service, listener)
                sock = bind_listener(service, listener, reuse_port=slot is not None)
        self.sockets[key] = sock
        return sock

    def _holds_port(self, listener: ListenerConf) -> bool:
        """True when this master holds a TCP socket of ``listener``'s family on its port under
        another spelling (``localhost`` for ``127.0.0.1``, a wildcard for a host): a reload
        or upgrade that re-spells or widens a pinned address. The probe of
        ``_check_port_free`` would then collide with this master's own socket; the pinned
        binds join its SO_REUSEPORT group or fail with their own error, as before."""
        if listener.socket_family == socket.AF_UNIX or not listener.port:
            return False
        for sock in self.sockets.values():
            try:
                if sock.family == listener.socket_family \
                        and sock.getsockname()[1] == listener.port:
                    return True
            except OSError:  # (closed meanwhile)
                continue
        return False

    def _held_at(self, listener: ListenerConf) -> dict[str, socket.socket]:
        """The sockets held for ``listener``'s address, by slot ("*" or "N"), any service."""
        out: dict[str, socket.socket] = {}
        for key, sock in self.sockets.items():
            _, _, rest = key.partition("/")
            address, _, slot = rest.rpartition("/")
            if address == listener.key:
                out.setdefault(slot, sock)
        return out

    def _other_mode(self, listener: ListenerConf, slot: Optional[int]) -> Optional[socket.socket]:
        """A held socket of the same address that the other work_stealing mode bound, to use
        for this key, or None (then the caller binds). A reload or an upgrade may switch a
        service between shared and pinned sockets, and the two cannot be bound side by side:
        a shared socket has no SO_REUSEPORT, so the pinned slots' binds would fail with
        "address already in use" (and the other way round). So the new mode takes one
        socket over from the old one and binds only the rest; the old mode's others are
        closed once its workers drained. A Unix socket has no SO_REUSEPORT at all: all slots
        of a pinned service share its one socket."""
        held = self._held_at(listener)
        if not held:
            return None
        if listener.socket_family == socket.AF_UNIX:
            return next(iter(held.values()))
        if slot is None:  # shared now, pinned before: slot 0's socket (it has SO_REUSEPORT)
            pinned = sorted((int(n), s) for n, s in held.items() if n.isdigit())
            return pinned[0][1] if pinned else None
        shared = held.get("*")
        if shared is None or any(s is shared for n, s in held.items() if n != "*"):
            return None  # no shared socket, or a lower slot took it: bind (joins its group)
        # Setting SO_REUSEPORT on a listening socket lets the new slots' binds join it
        # (Linux makes the group when the first of them listens).
        shared.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        return shared

    def _held_for(self, listener: ListenerConf, slot: Optional[int]) -> Optional[socket.socket]:
        """A socket already held for this address and slot under another service's name (a
        service renamed by a reload or an upgrade): shared, as an unchanged key's socket is
        shared by the old and new generations, instead of a second bind that would fail
        with "address already in use". Whoever drops the old key must not close it while
        a key still holds it (see ``holds``)."""
        tail = socket_key("", listener, slot)  # "/ADDRESS/SLOT"
        for key, sock in self.sockets.items():
            name = key[:len(key) - len(tail)]
            if key.endswith(tail) and name and "/" not in name:
                return sock
        return None

    def holds(self, sock: socket.socket) -> bool:
        """True while ``sock`` is some key's socket."""
        return any(s is sock for s in self.sockets.values())

    def keep_only(self, keys: set[str]) -> list[tuple[str, socket.socket]]:
        """Forget sockets whose keys are not in ``keys``; return (key, socket) pairs for the
        caller to close once their accept queues are drained (systemd sockets no service
        claimed have the key "")."""
        dropped = [(k, s) for k, s in self.sockets.items() if k not in keys]
        self.sockets = {k: s for k, s in self.sockets.items() if k in keys}
        for spare in self.by_address.values():
            dropped.extend(("", s) for s in spare)
        self.by_address.clear()
        return dropped

    def close_dropped(self, sock: socket.socket) -> None:
        """A listener no generation uses any more: closed, and a Unix socket's file removed
        unless a listener of the current configuration lives at that path now. One still
        held under another key (a renamed service's, the other work_stealing mode's) stays
        open."""
        if self.holds(sock):
            return
        unlink = sock.family == socket.AF_UNIX
        if unlink:
            try:
                path = sock.getsockname()
                live = {s.getsockname() for s in self.sockets.values()
                        if s.family == socket.AF_UNIX}
                unlink = bool(path) and path not in live
            except OSError:
                unlink = False
        close_listener(sock, unlink=unlink)

    def close_all(self, unlink: bool) -> None:
        for s in self.sockets.values():
            close_listener(s, unlink)
        self.sockets.clear()


def close_listener(sock: socket.socket, unlink: bool) -> None:
    path = None
    if unlink and sock.family == socket.AF_UNIX:
        try:
            name = sock.getsockname()
            path = name.decode() if isinstance(name, bytes) else name
        except OSError:
            path = None
    sock.close()
    if path:
        try:
            os.unlink(path)
        except OSError:
            pass
