"""Hand listening sockets from the old master to the new one (SPEC section 4).

Runs in the master processes only: the new master (started with ``-u``) creates an
:class:`UpgradeListener` before it binds anything, the old master calls :func:`send_sockets`
when it receives SIGQUIT. Everything here is blocking with deadlines (the master is
single-threaded at these points, or calls this from a helper thread): no asyncio, stdlib only.

It starts from Pingora's ``transfer_fd`` and fixes its gaps: any number of sockets (several
``sendmsg`` calls, never a 32-FD cap), sockets keyed by ``service/address/slot`` (several
SO_REUSEPORT slots of one address do not collide), a deadline chosen by the caller on both
sides, an explicit acknowledgement, and a result instead of an exception on the old side, so
that a failed hand-over never stops the old master from serving.

Wire format (one Unix stream connection, old master = client, new master = server)::

    old -> new   b"PYNGUPG1"                              8-byte magic, once
    old -> new   frame M  JSON manifest                   {"version": 1, "sockets":
                                                            [{"key", "family", "type"}, ...]}
    old -> new   frame F  struct "!II" (first, count)     x ceil(n / 200); the sendmsg that
                                                            carries the frame's first byte
                                                            carries exactly `count` FDs
                                                            (SCM_RIGHTS), in manifest order
    new -> old   frame R  (empty)                         every new worker accepts
             or  frame X  UTF-8 reason                    the new master gives up
    old -> new   frame C  (empty)                         after R only: the old master
                                                            commits (stops accepting, drains)

    frame = kind (1 ASCII byte) + payload length (4 bytes, big endian) + payload

The commit frame closes the race where the old master's wait for ``ready`` times out while
the new master's ``ready`` is in flight: the new master only believes it owns the service
once it has read ``C``; without it, the old master keeps serving and the new one must go.

Both sides check the peer's uid (SO_PEERCRED): only the same user or root may hand over or
receive sockets, on top of the 0600 mode of the socket file. A connection that fails on the
new side (garbage, a peer that dies midway) is answered ``X`` and dropped, and the new master
goes on waiting for a proper old master until its deadline; connections are read side by
side as their bytes come (no blocking read), so one that is silent, or begins and stalls or
trickles, holds up nobody, and is dropped ``_TRANSFER_SECONDS`` after its first byte. A
SIGTERM reaches the waiting master through its wake-up pipe. A new side that accepts and
stalls costs the old master (serving meanwhile) its connect wait, ``_MIN_TRANSFER_SECONDS``
more for the send and ``ready_timeout`` for the answer, no more. Adopted sockets are non-blocking:
O_NONBLOCK is shared with the old master's workers, which need it.

The manifest, the frames and the descriptor passing are built and checked in
``transfer_wire.py``; this module holds the conversation on top: who sends what, when, and
within which deadline.
"""

from __future__ import annotations

import os
import selectors
import socket
import stat
import struct
import time
from dataclasses import dataclass
from typing import Callable, Generator

# What goes on the wire (manifest, frames, descriptors) lives in transfer_wire; TransferError,
# SocketEntry, make_key, split_key and PROTOCOL_VERSION are re-exported from here, where they
# used to live.
from pyngora.upgrade.transfer_wire import (HEADER_SIZE, PROTOCOL_VERSION, SCM_MAX_FD, Reader,
                                           SocketEntry, TransferError, check_peer, close_fds,
                                           encode_manifest, frame, make_key, parse_manifest,
                                           remaining, send_all, split_key)

__all__ = [
    "TransferError", "TransferInterrupted", "SocketEntry", "HandoverResult", "UpgradeListener",
    "UpgradeConnection", "send_sockets", "make_key", "split_key", "MAGIC",
    "MAX_FDS_PER_MESSAGE", "PROTOCOL_VERSION",
]

MAGIC = b"PYNGUPG1"
# Linux accepts at most SCM_MAX_FD (253) descriptors per message; stay well below it.
MAX_FDS_PER_MESSAGE = 200
_MAX_MANIFEST_BYTES = 16 * 1024 * 1024
_MAX_SMALL_FRAME = 64 * 1024
_BATCH = struct.Struct("!II")
# A transfer that has started gets at least this long, even if the accept wait used up
# most of the caller's budget (the old master may connect at the last moment).
_MIN_TRANSFER_SECONDS = 5.0
# On the new side, a connection must send everything within this long of its first byte
# (a real old master sends it all at once): one that stalls or trickles is dropped, and
# the others, read side by side with it, never wait for it.
_TRANSFER_SECONDS = 5.0
# Connections that wait at once for their first bytes on the new side; a further one closes
# the oldest (only the same user may connect: this bounds a buggy client, not an attacker).
_MAX_WAITING = 16
_WAKE = object()  # the selector's mark for the caller's wake-up pipe

M_MANIFEST = b"M"
M_FDS = b"F"
M_READY = b"R"
M_FAILED = b"X"
M_COMMIT = b"C"


@dataclass(frozen=True)
class HandoverResult:
    """What :func:`send_sockets` achieved.

    ``ok`` is True only when the new master said ``ready`` and was told we commit: the old
    master must then stop accepting and drain. Otherwise it keeps serving; ``reason`` says
    why, and ``delivered`` whether the new master got the descriptors (it may then be
    running next to us until it notices our refusal and exits).
    """

    ok: bool
    reason: str
    delivered: bool = False


# --------------------------------------------------------------------------- new master


class TransferInterrupted(TransferError):
    """The new master was asked to stop while it waited for the old one."""


def _drain(fd: int) -> None:
    """Empty a non-blocking wake-up pipe (its bytes only say "look at your events")."""
    try:
        while os.read(fd, 4096):
            pass
    except OSError:  # BlockingIOError: empty
        pass


def _exact(reader: Reader, n: int) -> Generator[None, None, bytes]:
    """The next ``n`` bytes of ``reader``, yielding until they are buffered."""
    while True:
        data = reader.take(n)
        if data is not None:
            return data
        yield


def _receive(reader: Reader) -> Generator[None, None, list[SocketEntry]]:
    """Read magic, manifest and all batches; the FDs are in ``reader.fds``, in manifest order.

    A generator, so that connections are read side by side: it yields whenever it needs
    bytes that have not come yet (the caller reads more once the socket is readable, and
    sends None). Returns the manifest's entries; raises TransferError (the caller closes
    ``reader.fds``).
    """
    # Byte by byte: a peer whose first bytes are already wrong is turned away at once,
    # not once 8 have come.
    magic = b""
    while len(magic) < len(MAGIC):
        magic += yield from _exact(reader, 1)
        if not MAGIC.startswith(magic):
            raise TransferError(
                f"the peer is not a pyngora master (bad magic {magic!r}); garbage peer?"
            )
    header = yield from _exact(reader, HEADER_SIZE)
    _, length = reader.check_header(header, {M_MANIFEST: _MAX_MANIFEST_BYTES})
    entries = parse_manifest((yield from _exact(reader, length)))
    expected = 0
    while expected < len(entries):
        header = yield from _exact(reader, HEADER_SIZE)
        _, length = reader.check_header(header, {M_FDS: _BATCH.size})
        payload = yield from _exact(reader, length)
        if len(payload) != _BATCH.size:
            raise TransferError("receiving the sockets: malformed batch header")
        first, count = _BATCH.unpack(payload)
        if first != expected or not 0 < count <= SCM_MAX_FD or first + count > len(entries):
            raise TransferError(
                f"receiving the sockets: batch ({first}, {count}) does not follow "
                f"the manifest ({expected} of {len(entries)} received)"
            )
        expected += count
        # The FDs ride on this frame's first byte, which we have read by now.
        if len(reader.fds) < expected:
            raise TransferError(
                f"receiving the sockets: the manifest announces {len(entries)} sockets "
                f"but only {len(reader.fds)} descriptors arrived with {expected} announced"
            )
    if len(reader.fds) != len(entries):
        raise TransferError(
            f"receiving the sockets: the manifest announces {len(entries)} sockets "
            f"but {len(reader.fds)} descriptors arrived"
        )
    return entries


class _Incoming:
    """A connection on the new side, read as its bytes come, beside the others."""

    __slots__ = ("upgrade", "reader", "steps", "limit", "what")

    def __init__(self, upgrade: UpgradeConnection) -> None:
        self.upgrade = upgrade
        self.what = "receiving the sockets from the old master"
        if upgrade.peer_pid is not None:
            self.what += f" (pid {upgrade.peer_pid})"
        self.reader = Reader(upgrade.require(), 0.0, self.what)
        self.steps = _receive(self.reader)
        next(self.steps)  # to its first wait for bytes
        self.limit: float | None = None  # set by the first byte: the transfer's own deadline

    def readable(self, budget: float) -> list[SocketEntry] | None:
        """Called when the socket is readable: read once and parse what came. Returns the
        entries once the transfer is complete (FDs in ``reader.fds``), else None;
        TransferError for a bad or closed peer."""
        if not self.reader.fill_nowait():
            return None
        if self.limit is None:
            self.limit = time.monotonic() + budget
        try:
            self.steps.send(None)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        return None

    def drop(self, reason: str) -> None:
        """Refuse it (answer ``failed``) and close it with every descriptor it brought."""
        close_fds(self.reader.fds)
        self.steps.close()
        self.upgrade.send_failed(reason)
        self.upgrade.close()


def _adopt(entries: list[SocketEntry], fds: list[int]) -> dict[str, socket.socket]:
    """Wrap each FD in a socket and check it is what the manifest says; close all on error."""
    adopted: dict[str, socket.socket] = {}
    pending = list(fds)
    try:
        while pending:
            entry = entries[len(adopted)]
            try:
                sock = socket.socket(fileno=pending[0])
            except OSError as e:
                raise TransferError(
                    f"adopting {entry.key}: descriptor is not a socket ({e.strerror or e})"
                ) from None
            pending.pop(0)
            adopted[entry.key] = sock
            os.set_inheritable(sock.fileno(), False)
            # O_NONBLOCK lives on the open file description, shared with the old master's
            # workers: they need it set, so never make an adopted socket blocking. Setting it
            # here also makes Python's view (timeout 0.0) agree with the kernel's.
            sock.setblocking(False)
            if sock.family != entry.family or sock.type != entry.type:
                raise TransferError(
                    f"adopting {entry.key}: manifest says family {entry.family} type "
                    f"{entry.type}, the socket is family {int(sock.family)} type {int(sock.type)}"
                )
            # A socket that does not listen would be made to (asyncio's create_server calls
            # listen(), an unbound one on a port of the kernel's choosing) while nobody
            # serves the configured address once the old master drains.
            if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                raise TransferError(f"adopting {entry.key}: the socket is not listening")
        return adopted
    except BaseException:
        for sock in adopted.values():
            sock.close()
        close_fds(pending)
        raise


class UpgradeConnection:
    """The new master's side of one accepted hand-over, kept until it answers.

    ``peer_pid`` is the old master's pid (from SO_PEERCRED), None where unknown.
    """

    __slots__ = ("_sock", "peer_pid")

    def __init__(self, sock: socket.socket, peer_pid: int | None = None) -> None:
        self._sock: socket.socket | None = sock
        self.peer_pid = peer_pid

    def send_ready(self, timeout: float = 10.0) -> None:
        """Tell the old master every new worker accepts, and wait for its commit.

        Returns once the old master has committed (it stops accepting and drains). Raises
        TransferError when the old master is gone or gave up: it then keeps serving, and
        the new master should stop rather than share the sockets with it.
        """
        sock = self.require()
        deadline = time.monotonic() + timeout
        send_all(sock, frame(M_READY), deadline, "sending ready to the old master")
        reader = Reader(sock, deadline, "waiting for the old master's commit")
        try:
            reader.read_frame({M_COMMIT: 0})
        finally:
            close_fds(reader.fds)

    def send_failed(self, reason: str) -> None:
        """Tell the old master we give up (it keeps serving). Best effort, never raises."""
        if self._sock is None:
            return
        payload = reason.encode("utf-8", "replace")[:_MAX_SMALL_FRAME]
        try:
            send_all(self._sock, frame(M_FAILED, payload), time.monotonic() + 1.0, "failed")
        except TransferError:
            pass

    def close(self) -> None:
        """Close the connection; idempotent."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def require(self) -> socket.socket:
        """The connection's socket; TransferError once closed."""
        if self._sock is None:
            raise TransferError("the upgrade connection is closed")
        return self._sock

    def __enter__(self) -> UpgradeConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class UpgradeListener:
    """The Unix socket (``upgrade_sock``) the new master waits on for the old master.

    Created when a master starts with ``-u``, before it binds any listener. Refuses to take
    over a path another live process listens on; removes a stale socket file.
    """

    __slots__ = ("path", "_sock", "_ident")

    def __init__(self, path: str) -> None:
        self.path = path
        self._ident: tuple[int, int] | None = None
        _remove_stale(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # On Linux the socket file takes the socket inode's mode: 0600 from the start,
            # with no window in which another user could connect. chmod again for the others.
            os.fchmod(sock.fileno(), 0o600)
            sock.bind(path)
            os.chmod(path, 0o600)
            st = os.stat(path)
            self._ident = (st.st_dev, st.st_ino)
            sock.listen(16)
        except OSError as e:
            sock.close()
            raise TransferError(f"binding upgrade socket {path}: {e.strerror or e}") from None
        self._sock: socket.socket | None = sock

    def accept_sockets(
        self, timeout: float, wake_fd: int = -1, stop: Callable[[], bool] | None = None
    ) -> tuple[UpgradeConnection, dict[str, socket.socket]]:
        """Wait up to ``timeout`` s for the old master and receive every socket it holds.

        Returns the connection (to answer ready/failed on) and the adopted sockets by key,
        each with CLOEXEC set and non-blocking (never make them blocking: the old master's
        workers share the flag). Several connections may wait at once, read side by side as
        their bytes come, so one that connects and stays silent (a probe, a stranger), or
        sends the magic and stalls, never holds up the old master queued behind it. A
        connection that fails (garbage, dies midway, wrong uid, not done within
        ``_TRANSFER_SECONDS`` of its first byte) is answered ``failed`` and closed with
        everything it brought, and the wait goes on for a proper one; a transfer begun
        before the deadline may finish after it. TransferError when the deadline passes,
        naming the last failure. ``wake_fd`` (a signal wake-up pipe, drained here)
        becoming readable makes it ask ``stop()``: TransferInterrupted when that is true.
        """
        listener = self._sock
        if listener is None:
            raise TransferError(f"upgrade socket {self.path} is closed")
        deadline = time.monotonic() + timeout
        budget = min(timeout, _TRANSFER_SECONDS)
        last_error = ""
        listener.setblocking(False)
        sel = selectors.DefaultSelector()
        sel.register(listener, selectors.EVENT_READ, None)
        if wake_fd >= 0:
            sel.register(wake_fd, selectors.EVENT_READ, _WAKE)
        waiting: list[_Incoming] = []
        try:
            while True:
                if stop is not None and stop():
                    raise TransferInterrupted("stopped while waiting for the old master")
                now = time.monotonic()
                end = deadline
                for inc in list(waiting):
                    if inc.limit is None:
                        continue
                    if inc.limit <= now:
                        last_error = (f"timed out {inc.what}: the peer began but did not "
                                      f"finish within {budget:g}s (stalled?)")
                        self._drop(inc, last_error, sel, waiting)
                    elif inc.limit - budget < deadline:
                        # a transfer that began before the deadline may finish after it
                        end = max(end, inc.limit)
                left = end - now
                if left <= 0:
                    break
                started = [inc.limit for inc in waiting if inc.limit is not None]
                if started:
                    left = min(left, min(started) - now)
                for key, _ in sel.select(max(left, 0.0)):
                    if key.data is _WAKE:
                        _drain(wake_fd)
                    elif key.data is None:
                        last_error = self._accept_one(listener, sel, waiting) or last_error
                    elif key.data not in waiting:
                        continue  # evicted by an accept earlier in this batch (closed)
                    else:
                        inc: _Incoming = key.data
                        try:
                            entries = inc.readable(budget)
                            if entries is None:
                                continue
                            self._forget(inc, sel, waiting)
                            # _adopt owns them now: adopted, or closed on its error
                            fds, inc.reader.fds = inc.reader.fds, []
                            return inc.upgrade, _adopt(entries, fds)
                        except TransferError as e:
                            last_error = str(e)
                            self._drop(inc, last_error, sel, waiting)
                        except BaseException:
                            self._drop(inc, "interrupted", sel, waiting)
                            raise
        finally:
            sel.close()
            for inc in waiting:
                close_fds(inc.reader.fds)
                inc.upgrade.close()
        detail = f"; last attempt: {last_error}" if last_error else ""
        raise TransferError(
            f"no old master handed over its sockets on {self.path} within {timeout:g}s{detail}"
        )

    @staticmethod
    def _forget(inc: _Incoming, sel: selectors.BaseSelector, waiting: list[_Incoming]) -> None:
        """Stop watching ``inc`` (it is done, one way or the other)."""
        if inc in waiting:
            waiting.remove(inc)
            sel.unregister(inc.upgrade.require())

    def _drop(self, inc: _Incoming, reason: str, sel: selectors.BaseSelector,
              waiting: list[_Incoming]) -> None:
        """Refuse ``inc`` (``failed``, then closed with what it brought)."""
        self._forget(inc, sel, waiting)
        inc.drop(reason)

    def _accept_one(
        self, listener: socket.socket, sel: selectors.BaseSelector,
        waiting: list[_Incoming],
    ) -> str:
        """Accept one connection and wait for its first bytes beside the others; returns why
        it was refused ("" when it waits, or when there was nothing to accept)."""
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return ""
        except OSError as e:
            raise TransferError(f"accepting on {self.path}: {e.strerror or e}") from None
        upgrade = UpgradeConnection(conn)
        try:
            upgrade.peer_pid = check_peer(conn, "accepting the old master")
        except TransferError as e:
            upgrade.send_failed(str(e))
            upgrade.close()
            return str(e)
        if len(waiting) >= _MAX_WAITING:  # the oldest silent one makes room (else the oldest)
            oldest = next((inc for inc in waiting if inc.limit is None), waiting[0])
            self._drop(oldest, "too many connections wait on the upgrade socket", sel, waiting)
        inc = _Incoming(upgrade)
        waiting.append(inc)
        sel.register(conn, selectors.EVENT_READ, inc)
        return ""

    def close(self) -> None:
        """Close the listening socket and remove its file (if it is still ours); idempotent."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._ident is not None:
            try:
                st = os.stat(self.path)
                if (st.st_dev, st.st_ino) == self._ident:
                    os.unlink(self.path)
            except OSError:
                pass
            self._ident = None

    def __enter__(self) -> UpgradeListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _remove_stale(path: str) -> None:
    """Unlink a leftover socket file; refuse a live listener or a file that is not a socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise TransferError(f"upgrade socket {path}: {e.strerror or e}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise TransferError(f"upgrade socket {path} exists and is not a socket; not removing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError:
        pass  # refused (stale) or unreachable: nobody is waiting on it
    else:
        raise TransferError(f"upgrade socket {path}: another process is listening on it")
    finally:
        probe.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise TransferError(f"removing stale upgrade socket {path}: {e.strerror or e}") from None


# --------------------------------------------------------------------------- old master


def _connect(path: str, deadline: float) -> socket.socket:
    """Connect to the new master, retrying (it may not listen yet) until the deadline."""
    delay = 0.05
    last = "nothing listening"
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(remaining(deadline, f"connecting to {path} ({last})"))
            sock.connect(path)
            return sock
        except TransferError:
            sock.close()
            raise
        except OSError as e:
            sock.close()
            last = e.strerror or str(e)
        left = deadline - time.monotonic()
        if left <= 0:
            raise TransferError(f"timed out connecting to {path} ({last})")
        time.sleep(min(delay, left))
        delay = min(delay * 2, 0.5)


def send_sockets(
    path: str,
    sockets: dict[str, socket.socket],
    timeout: float,
    ready_timeout: float | None = None,
) -> HandoverResult:
    """Hand ``sockets`` (key -> listening socket) to the new master listening on ``path``.

    Runs in the old master on SIGQUIT. Connects (retrying up to ``timeout``), sends the
    manifest and every FD, then waits up to ``ready_timeout`` (default ``timeout``) for the
    new master's answer. Never raises for a protocol failure: the returned result says
    whether to stop accepting (``ok``) or keep serving (``reason`` says why). Our sockets
    stay open and ours in every case.
    """
    try:
        entries = [SocketEntry(k, int(s.family), int(s.type)) for k, s in sockets.items()]
        for entry in entries:
            split_key(entry.key)
        fds = [s.fileno() for s in sockets.values()]
    except (ValueError, OSError) as e:
        return HandoverResult(False, f"cannot describe our sockets: {e}")
    if any(fd < 0 for fd in fds):
        return HandoverResult(False, "cannot hand over a closed socket")
    manifest = encode_manifest(entries)
    deadline = time.monotonic() + timeout
    delivered = False
    try:
        sock = _connect(path, deadline)
    except TransferError as e:
        return HandoverResult(False, str(e))
    try:
        check_peer(sock, f"connecting to {path}")
        deadline = max(deadline, time.monotonic() + min(timeout, _MIN_TRANSFER_SECONDS))
        what = f"sending the sockets to the new master on {path}"
        send_all(sock, MAGIC + frame(M_MANIFEST, manifest), deadline, what)
        for first in range(0, len(fds), MAX_FDS_PER_MESSAGE):
            batch = fds[first : first + MAX_FDS_PER_MESSAGE]
            send_all(sock, frame(M_FDS, _BATCH.pack(first, len(batch))), deadline, what, batch)
        delivered = True
        wait = timeout if ready_timeout is None else ready_timeout
        reader = Reader(sock, time.monotonic() + wait, "waiting for the new master's ready")
        try:
            kind, payload = reader.read_frame({M_READY: 0, M_FAILED: _MAX_SMALL_FRAME})
        finally:
            close_fds(reader.fds)  # a misbehaving peer may send descriptors back
        if kind == M_FAILED:
            reason = payload.decode("utf-8", "replace")
            return HandoverResult(False, f"the new master failed: {reason}", delivered)
        # Commit: only if the new master is still there to read it does it take over.
        send_all(sock, frame(M_COMMIT), time.monotonic() + 5.0, "committing the hand-over")
        return HandoverResult(True, "ready", delivered)
    except TransferError as e:
        return HandoverResult(False, str(e), delivered)
    finally:
        sock.close()
