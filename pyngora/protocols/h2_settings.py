"""A client's SETTINGS frame read whole, sans-IO: its entries checked (RFC 9113 6.5.2) and
folded into one value per identifier, for ``protocols/h2_wire.py`` to apply once.

Why fold: a SETTINGS frame may repeat an identifier (up to 2,730 entries in 16 KiB), and
applying SETTINGS_INITIAL_WINDOW_SIZE means walking every open stream. Applied entry by
entry, one frame of alternating window sizes walked 100 streams 2,730 times (~27 ms of the
worker for 16 KiB of input, an attack review's finding). Every entry still counts: the value
that takes effect is the last one (RFC 9113 6.5.3: processed in order), and the largest
window size passed on the way is kept, because every stream window moves by the same amount
with each entry, so that largest one is the only value that could have pushed a window past
2^31-1 (a connection error, RFC 9113 6.9.2).
"""
from __future__ import annotations

from pyngora.protocols.h2_frames import (FLOW_CONTROL_ERROR, FRAME_SIZE_ERROR, MAX_WINDOW,
                                         PROTOCOL_ERROR, S_ENABLE_PUSH, S_INITIAL_WINDOW_SIZE,
                                         S_MAX_FRAME_SIZE, ConnectionError_)

__all__ = ["read_settings", "ENTRIES_PER_OVERHEAD"]

# A SETTINGS frame counts as one frame of overhead (the flood rules of ``protocols/h2.py``)
# plus one per this many entries: a client's usual frame has 2 to 6, a flood thousands.
ENTRIES_PER_OVERHEAD = 10


def read_settings(payload: bytes) -> tuple[dict[int, int], int]:
    """The payload of a SETTINGS frame (not an ACK) -> (the last value of each identifier
    in it, the largest SETTINGS_INITIAL_WINDOW_SIZE among its entries, or -1 when it has
    none). Raises ConnectionError_ for a payload or value RFC 9113 6.5 forbids."""
    n = len(payload)
    if n % 6:
        raise ConnectionError_(FRAME_SIZE_ERROR, "SETTINGS not a multiple of 6 bytes")
    values: dict[int, int] = {}
    top = -1
    for j in range(0, n, 6):
        ident = payload[j] << 8 | payload[j + 1]
        value = int.from_bytes(payload[j + 2:j + 6], "big")
        if ident == S_INITIAL_WINDOW_SIZE:
            if value > MAX_WINDOW:
                raise ConnectionError_(FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE past 2^31-1")
            if value > top:
                top = value
        elif ident == S_MAX_FRAME_SIZE:
            if not 16384 <= value <= 16777215:
                raise ConnectionError_(PROTOCOL_ERROR, f"MAX_FRAME_SIZE {value}")
        elif ident == S_ENABLE_PUSH:
            if value > 1:
                raise ConnectionError_(PROTOCOL_ERROR, f"ENABLE_PUSH {value}")
        values[ident] = value
    return values, top
