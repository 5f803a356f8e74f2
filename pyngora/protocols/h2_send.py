"""A stream's queued output under HTTP/2 flow control, for both sides (``protocols.h2``'s
server over ``protocols.h2_wire``, and ``protocols.h2_client`` over the h2 library): sans-IO,
it only decides what goes out when; the callers' frame layers write it."""
from __future__ import annotations

from typing import Any, Callable, Optional

__all__ = ["send_queued"]


def send_queued(s: Any, window: Callable[[], int], data: Callable[[bytes, bool], None],
                finish: Callable[[Optional[list]], None]) -> bool:
    """Send what stream record ``s`` has queued, as far as the flow-control windows allow,
    then its end once nothing is left: END_STREAM on the last DATA frame, or the trailers.

    ``s``: ``out`` (a deque of bytes or memoryviews, consumed here), ``out_bytes`` (their
    total, kept up to date), ``end`` (the body is complete) and ``trailers`` (None, or the
    fields to end with). ``window()``: how many bytes the next DATA frame may carry;
    ``data(chunk, end)`` sends one (``chunk`` may be a memoryview: the frame layer copies it
    into its output); ``finish(trailers)`` ends the stream when the last DATA frame could not
    (trailers, or an empty body end). Returns True once the end went out: nothing more may
    be sent."""
    out = s.out
    while out:
        w = window()
        if w <= 0:
            return False  # the peer's WINDOW_UPDATE calls the caller's flush again
        chunk = out[0]
        n = len(chunk)
        if n <= w:
            out.popleft()
            s.out_bytes -= n
            last = not out and s.end and s.trailers is None
            data(chunk, last)
            if last:
                return True
        else:
            # A view, so that a large chunk sent frame by frame is not copied again for
            # each frame (slicing bytes copies the rest: quadratic in the chunk's size).
            # (A bytearray is copied once first: its owner may change or resize it later.)
            view = chunk if chunk.__class__ is memoryview else memoryview(
                chunk if chunk.__class__ is bytes else bytes(chunk))
            out[0] = view[w:]
            s.out_bytes -= w
            data(view[:w], False)
    if not s.end:
        return False
    finish(s.trailers)
    return True
