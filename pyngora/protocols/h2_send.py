"""A stream's queued output under HTTP/2 flow control, for both sides (``protocols.h2``'s
server and ``protocols.h2_client``): sans-IO, it only drives an ``h2`` connection."""
from __future__ import annotations

from typing import Any

import h2.connection

__all__ = ["send_queued"]


def send_queued(conn: h2.connection.H2Connection, sid: int, s: Any) -> bool:
    """Send what stream ``sid`` has queued, as far as the flow-control windows allow, then its
    end once nothing is left: END_STREAM on the last DATA frame, or the trailers.

    ``s`` is the caller's stream record: ``out`` (a deque of bytes, consumed here),
    ``out_bytes`` (their total, kept up to date), ``end`` (the body is complete) and
    ``trailers`` (None, or the fields to end with). Returns True once the end went out: nothing
    more may be sent on the stream. Raises what h2 raises (StreamClosedError after a reset)."""
    out = s.out
    while out:
        window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
        if window <= 0:
            return False  # the peer's WINDOW_UPDATE calls the caller's flush again
        chunk = out[0]
        n = len(chunk)
        if n <= window:
            out.popleft()
            s.out_bytes -= n
            last = not out and s.end and s.trailers is None
            conn.send_data(sid, chunk, end_stream=last)
            if last:
                return True
        else:
            out[0] = chunk[window:]
            s.out_bytes -= window
            conn.send_data(sid, chunk[:window])
    if not s.end:
        return False
    if s.trailers is not None:
        conn.send_headers(sid, s.trailers, end_stream=True)
    else:
        conn.end_stream(sid)
    return True
