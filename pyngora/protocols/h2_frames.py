"""HTTP/2's vocabulary, sans-IO: frame types, flags, error codes, SETTINGS identifiers, the
frame header, and the per-stream protocol state (``WireStream``); ``protocols/h2_wire.py``
(the downstream server's frame layer) is built from them."""
from __future__ import annotations

import struct

__all__ = ["PREFACE", "NO_ERROR", "PROTOCOL_ERROR", "INTERNAL_ERROR", "FLOW_CONTROL_ERROR",
           "STREAM_CLOSED", "FRAME_SIZE_ERROR", "REFUSED_STREAM", "CANCEL",
           "COMPRESSION_ERROR", "ENHANCE_YOUR_CALM", "S_HEADER_TABLE_SIZE", "S_ENABLE_PUSH",
           "S_MAX_CONCURRENT_STREAMS", "S_INITIAL_WINDOW_SIZE", "S_MAX_FRAME_SIZE",
           "S_MAX_HEADER_LIST_SIZE", "MAX_WINDOW", "DEFAULT_WINDOW", "DATA", "HEADERS",
           "PRIORITY", "RST_STREAM", "SETTINGS", "PUSH_PROMISE", "PING", "GOAWAY",
           "WINDOW_UPDATE", "CONTINUATION", "END_STREAM", "ACK", "END_HEADERS", "PADDED",
           "PRIORITY_FLAG", "head", "u32", "frame", "SETTINGS_ACK", "ConnectionError_",
           "WireStream"]

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
FLOW_CONTROL_ERROR = 0x3
STREAM_CLOSED = 0x5
FRAME_SIZE_ERROR = 0x6
REFUSED_STREAM = 0x7
CANCEL = 0x8
COMPRESSION_ERROR = 0x9
ENHANCE_YOUR_CALM = 0xB

MAX_WINDOW = 2 ** 31 - 1
DEFAULT_WINDOW = 65535
# Frame types and flags (RFC 9113 6).
(DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE,
 CONTINUATION) = range(10)
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20
# SETTINGS identifiers.
S_HEADER_TABLE_SIZE = 0x1
S_ENABLE_PUSH = 0x2
S_MAX_CONCURRENT_STREAMS = 0x3
S_INITIAL_WINDOW_SIZE = 0x4
S_MAX_FRAME_SIZE = 0x5
S_MAX_HEADER_LIST_SIZE = 0x6

head = struct.Struct(">BHBBI").pack  # a frame header: length (24 bits), type, flags, stream
u32 = struct.Struct(">I").pack
SETTINGS_ACK = head(0, 0, SETTINGS, ACK, 0)


def frame(typ: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    """One frame, whole."""
    n = len(payload)
    return head(n >> 16, n & 0xFFFF, typ, flags, sid) + payload


class ConnectionError_(Exception):
    """A connection error (RFC 9113 5.4.1): GOAWAY with ``code``, then nothing more."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


class WireStream:
    """One stream's protocol state: which ends are closed, and its two windows."""

    __slots__ = ("send_window", "recv_window", "recv_max", "recv_read", "remote_closed",
                 "local_closed")

    def __init__(self, send_window: int, recv_window: int) -> None:
        self.send_window = send_window  # what we may still send (the client's window)
        self.recv_window = recv_window  # what the client may still send us
        self.recv_max = recv_window     # our SETTINGS_INITIAL_WINDOW_SIZE for it
        self.recv_read = 0              # bytes read and not yet returned by WINDOW_UPDATE
        self.remote_closed = False      # the client's END_STREAM came
        self.local_closed = False       # our END_STREAM went out
