"""What the socket hand-over puts on the wire (``transfer_fd.py`` holds the conversation).

Blocking, with deadlines, standard library only (``upgrade`` is a leaf; no asyncio): both
masters call this while they hand sockets over. The manifest (JSON: one :class:`SocketEntry`
per socket, keyed ``service/address/slot``) is built by :func:`encode_manifest` on the old
master and checked by :func:`parse_manifest` on the new one. A frame is a kind (1 ASCII byte),
a payload length (4 bytes, big endian) and the payload; file descriptors (SCM_RIGHTS) ride on
the ``sendmsg`` that carries a frame's first byte. :class:`Reader` takes ownership of every
descriptor that arrives before it checks anything, so an error path can close them all;
:func:`check_peer` refuses a peer that runs as another user (SO_PEERCRED). Every failure is a
:class:`TransferError` naming the step.
"""

from __future__ import annotations

import array
import json
import os
import socket
import struct
import time
from dataclasses import asdict, dataclass

__all__ = ["TransferError", "SocketEntry", "make_key", "split_key", "encode_manifest",
           "parse_manifest", "PROTOCOL_VERSION", "SCM_MAX_FD", "remaining", "send_all", "frame",
           "close_fds", "Reader", "check_peer", "HEADER_SIZE"]

PROTOCOL_VERSION = 1
_MAX_SOCKETS = 65536

# Linux accepts at most SCM_MAX_FD (253) descriptors per message.
SCM_MAX_FD = 253
# A frame's header: kind (1 byte) and payload length (4 bytes, big endian).
_HEADER = struct.Struct("!cI")
HEADER_SIZE = _HEADER.size
_INT_SIZE = array.array("i").itemsize
# Room for the largest SCM_RIGHTS message the kernel can deliver: a sender that tries more
# gets an error on its side, so MSG_CTRUNC here means we ran out of descriptors (EMFILE).
_ANC_SPACE = socket.CMSG_SPACE(SCM_MAX_FD * _INT_SIZE)
_RECV_BYTES = 65536
_CMSG_CLOEXEC = getattr(socket, "MSG_CMSG_CLOEXEC", 0)
# A vanished peer must give EPIPE, never SIGPIPE, even where a master reset the signal.
_NOSIGNAL = getattr(socket, "MSG_NOSIGNAL", 0)


class TransferError(Exception):
    """A hand-over step failed; the message says which step and why."""


class _WouldBlock(Exception):
    """(Reader's) a non-blocking read found nothing to read."""


# --------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class SocketEntry:
    """One manifest line: ``key`` is ``service/address/slot`` (slot ``*`` when shared)."""

    key: str
    family: int
    type: int


def make_key(service: str, address: str, slot: int | str) -> str:
    """Build the manifest key of a listening socket; ``slot`` is the worker slot or ``*``."""
    key = f"{service}/{address}/{slot}"
    split_key(key)
    return key


def split_key(key: str) -> tuple[str, str, str]:
    """Split ``service/address/slot`` (the address may itself contain ``/``: ``unix:/p``).

    Raises ValueError when a part is empty or the slot is neither ``*`` nor a number.
    """
    service, sep, rest = key.partition("/")
    address, sep2, slot = rest.rpartition("/")
    if not (sep and sep2 and service and address and slot):
        raise ValueError(f"bad socket key {key!r}: expected service/address/slot")
    if slot != "*" and not slot.isdigit():
        raise ValueError(f"bad socket key {key!r}: slot must be '*' or a number")
    return service, address, slot


def encode_manifest(entries: list[SocketEntry]) -> bytes:
    """The old master's side: the manifest frame's payload (compact JSON) for ``entries``."""
    return json.dumps(
        {"version": PROTOCOL_VERSION, "sockets": [asdict(e) for e in entries]},
        separators=(",", ":"),
    ).encode()


def parse_manifest(payload: bytes) -> list[SocketEntry]:
    """The new master's side: the manifest frame's payload -> its entries, in order.

    Raises TransferError for anything but a version-1 list of well-formed, distinct keys.
    """
    try:
        doc = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise TransferError(f"receiving the manifest: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("version") != PROTOCOL_VERSION:
        version = doc.get("version") if isinstance(doc, dict) else None
        raise TransferError(f"receiving the manifest: unsupported version {version!r}")
    items = doc.get("sockets")
    if not isinstance(items, list) or len(items) > _MAX_SOCKETS:
        raise TransferError("receiving the manifest: 'sockets' must be a list")
    entries: list[SocketEntry] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        ok = (
            isinstance(item, dict)
            and isinstance(item.get("key"), str)
            and type(item.get("family")) is int
            and type(item.get("type")) is int
        )
        if not ok:
            raise TransferError(f"receiving the manifest: entry {i} is malformed: {item!r:.200}")
        try:
            split_key(item["key"])
        except ValueError as e:
            raise TransferError(f"receiving the manifest: {e}") from None
        if item["key"] in seen:
            raise TransferError(f"receiving the manifest: duplicate key {item['key']!r}")
        seen.add(item["key"])
        entries.append(SocketEntry(item["key"], item["family"], item["type"]))
    return entries


# --------------------------------------------------------------------------- framing


def remaining(deadline: float, what: str) -> float:
    """Seconds left until ``deadline`` (monotonic); TransferError "timed out ``what``" if none."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TransferError(f"timed out {what}")
    return left


def send_all(
    sock: socket.socket, data: bytes, deadline: float, what: str, fds: list[int] | None = None
) -> None:
    """Send ``data`` completely; ``fds`` ride on the first sendmsg (the frame's first byte)."""
    view = memoryview(data)
    try:
        if fds:
            sock.settimeout(remaining(deadline, what))
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
            sent = sock.sendmsg([view], anc, _NOSIGNAL)
            view = view[sent:]
        while view:
            sock.settimeout(remaining(deadline, what))
            view = view[sock.send(view, _NOSIGNAL):]
    except TransferError:
        raise
    except (TimeoutError, socket.timeout):
        raise TransferError(f"timed out {what}") from None
    except OSError as e:
        raise TransferError(f"{what}: {e.strerror or e}") from None


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    """The bytes of one frame: header (kind, payload length) then ``payload``."""
    return _HEADER.pack(kind, len(payload)) + payload


def close_fds(fds: list[int]) -> None:
    """Close every descriptor in ``fds`` (ignoring errors) and empty the list."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()


class Reader:
    """Reads frames from a Unix stream socket and collects every FD that arrives.

    The caller owns ``fds`` and must close what it does not adopt, in every path.
    """

    __slots__ = ("_sock", "_buf", "fds", "_deadline", "_what")

    def __init__(self, sock: socket.socket, deadline: float, what: str) -> None:
        self._sock = sock
        self._buf = bytearray()
        self.fds: list[int] = []
        self._deadline = deadline
        self._what = what

    def _fill(self) -> None:
        """One ``recvmsg``: its bytes go to the buffer, its descriptors to ``fds``."""
        self._sock.settimeout(remaining(self._deadline, self._what))
        self._recv()

    def fill_nowait(self) -> bool:
        """One ``recvmsg`` that does not wait (the caller's selector said "readable"):
        False when nothing was there after all; TransferError on EOF or an error. The
        socket is left non-blocking."""
        self._sock.settimeout(0.0)
        try:
            self._recv()
        except _WouldBlock:
            return False
        return True

    def take(self, n: int) -> bytes | None:
        """The next ``n`` bytes if they are buffered (consumed), else None (nothing read)."""
        if len(self._buf) < n:
            return None
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def check_header(self, header: bytes, limits: dict[bytes, int]) -> tuple[bytes, int]:
        """A frame header -> (kind, payload length); ``limits`` maps allowed kinds to sizes."""
        kind, length = _HEADER.unpack(header)
        if kind not in limits:
            raise TransferError(f"{self._what}: unexpected message {kind!r} (garbage peer?)")
        if length > limits[kind]:
            raise TransferError(f"{self._what}: message {kind!r} too large ({length} bytes)")
        return kind, length

    def _recv(self) -> None:
        try:
            data, ancdata, flags, _ = self._sock.recvmsg(_RECV_BYTES, _ANC_SPACE, _CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            raise _WouldBlock from None
        except (TimeoutError, socket.timeout):
            raise TransferError(f"timed out {self._what}") from None
        except OSError as e:
            raise TransferError(f"{self._what}: {e.strerror or e}") from None
        # Take ownership of descriptors before any check, so an error path closes them.
        for level, ctype, cdata in ancdata:
            if level == socket.SOL_SOCKET and ctype == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(cdata[: len(cdata) - len(cdata) % _INT_SIZE])
                self.fds.extend(got)
                if not _CMSG_CLOEXEC:
                    for fd in got:
                        os.set_inheritable(fd, False)
        if flags & socket.MSG_CTRUNC:
            raise TransferError(
                f"{self._what}: file descriptors were truncated by the kernel "
                "(out of descriptors? raise RLIMIT_NOFILE)"
            )
        if not data:
            raise TransferError(f"{self._what}: the peer closed the connection")
        self._buf += data

    def read_exact(self, n: int) -> bytes:
        """The next ``n`` bytes (reading as needed); TransferError on timeout or EOF."""
        while len(self._buf) < n:
            self._fill()
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def read_frame(self, limits: dict[bytes, int]) -> tuple[bytes, bytes]:
        """Return (kind, payload) of the next frame; ``limits`` maps allowed kinds to sizes."""
        kind, length = self.check_header(self.read_exact(_HEADER.size), limits)
        return kind, self.read_exact(length)


def check_peer(sock: socket.socket, what: str) -> int | None:
    """Only our own user (or root) may exchange listening sockets with us; returns its pid."""
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError as e:
        raise TransferError(f"{what}: cannot read the peer's credentials: {e}") from None
    pid, uid, _gid = struct.unpack("3i", creds)
    if uid not in (os.geteuid(), 0):
        raise TransferError(f"{what}: peer pid {pid} runs as uid {uid}, not ours; refused")
    return pid
