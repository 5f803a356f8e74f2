"""protocols.h2_send.send_queued: a stream's output under flow control, sans-IO."""
from __future__ import annotations

from collections import deque
from typing import Any, Optional

from pyngora.protocols.h2_send import send_queued


class _Stream:
    def __init__(self, chunks: list[bytes], end: bool, trailers: Optional[list] = None) -> None:
        self.out: deque[Any] = deque(chunks)
        self.out_bytes = sum(len(c) for c in chunks)
        self.end = end
        self.trailers = trailers


def _drive(s: _Stream, windows: list[int]) -> tuple[list[tuple[Any, bool]], list, bool]:
    sent: list[tuple[Any, bool]] = []
    finished: list = []
    it = iter(windows)
    done = send_queued(s, lambda: next(it, 0), lambda c, e: sent.append((c, e)),
                       finished.append)
    return sent, finished, done


def test_frames_follow_the_window_and_end_stream_rides_on_the_last() -> None:
    s = _Stream([b"abcdef", b"gh"], end=True)
    sent, finished, done = _drive(s, [4, 4, 4])
    assert [bytes(c) for c, _ in sent] == [b"abcd", b"ef", b"gh"]
    assert [e for _, e in sent] == [False, False, True]
    assert done and not finished and s.out_bytes == 0 and not s.out


def test_a_shut_window_keeps_the_rest_queued() -> None:
    s = _Stream([b"abcdef"], end=True)
    sent, finished, done = _drive(s, [2])
    assert [bytes(c) for c, _ in sent] == [b"ab"]
    assert not done and s.out_bytes == 4 and bytes(s.out[0]) == b"cdef"
    sent, finished, done = _drive(s, [16])  # the WINDOW_UPDATE came
    assert [(bytes(c), e) for c, e in sent] == [(b"cdef", True)] and done


def test_trailers_or_an_empty_end_go_through_finish() -> None:
    s = _Stream([b"ab"], end=True, trailers=[(b"x", b"1")])
    sent, finished, done = _drive(s, [8])
    assert [(bytes(c), e) for c, e in sent] == [(b"ab", False)]
    assert finished == [[(b"x", b"1")]] and done
    s = _Stream([], end=True)
    assert _drive(s, []) == ([], [None], True)


def test_a_large_chunk_is_sent_as_views_of_itself_not_copies() -> None:
    # Slicing bytes copies: a 4 MiB chunk in 16 KiB frames would copy ~512 MiB (the rest,
    # again and again). Each frame must be a view of the one chunk.
    chunk = bytes(range(256)) * 4096  # 1 MiB
    s = _Stream([chunk], end=True)
    sent, _, done = _drive(s, [16384] * 64)
    assert done and len(sent) == 64
    assert all(isinstance(c, memoryview) and c.obj is chunk for c, _ in sent)
    assert b"".join(bytes(c) for c, _ in sent) == chunk


def test_a_bytearray_chunk_is_copied_once_so_its_owner_may_change_it() -> None:
    buf = bytearray(b"abcdefgh")
    s = _Stream([buf], end=True)
    sent, _, done = _drive(s, [3])
    buf.clear()  # a view of it would refuse (BufferError) or change what is still queued
    buf += b"XXXXXXXX"
    sent2, _, done2 = _drive(s, [16])
    assert [bytes(c) for c, _ in sent + sent2] == [b"abc", b"defgh"] and done2
