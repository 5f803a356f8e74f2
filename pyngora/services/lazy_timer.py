"""One lazily moved loop timer per connection: the header, body and keep-alive timeouts of an
HTTP/1 connection (``H1Connection`` mixes it in)."""
from __future__ import annotations

import asyncio
from typing import Callable, Optional

__all__ = ["LazyTimer"]


class LazyTimer:
    """``_arm(delay, callback)`` runs ``callback`` in ``delay`` seconds unless re-armed or
    cancelled first.

    Lazy, because a connection arms it twice per request: the loop timer is only moved
    earlier when needed; when it fires early it re-schedules itself for the current deadline.
    So a keep-alive request costs no timer-heap work at all. The class using it provides
    ``loop`` and ``closed``."""

    __slots__ = ("_timer", "_deadline", "_timer_cb")

    loop: asyncio.AbstractEventLoop
    closed: bool

    def _init_timer(self) -> None:
        self._timer: Optional[asyncio.TimerHandle] = None
        self._deadline: Optional[float] = None  # when _timer_cb is due (None: no timeout)
        self._timer_cb: Optional[Callable[[], None]] = None

    def _arm(self, delay: Optional[float], callback: Callable[[], None]) -> None:
        if not delay or delay <= 0:
            self._deadline = None
            return
        when = self.loop.time() + delay
        self._deadline = when
        self._timer_cb = callback
        timer = self._timer
        if timer is not None:
            if timer.when() <= when:
                return
            timer.cancel()
        self._timer = self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline is None or self.closed:
            return
        if self.loop.time() < deadline:
            self._timer = self.loop.call_at(deadline, self._on_timer)
            return
        self._deadline = None
        callback, self._timer_cb = self._timer_cb, None
        if callback is not None:
            callback()

    def _cancel_timer(self) -> None:
        self._deadline = None

    def _drop_timer(self) -> None:
        """Cancel the loop timer itself and forget the callback: the connection is gone, and a
        pending timer (or the callback, a bound method) would keep it alive."""
        self._deadline = None
        self._timer_cb = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
