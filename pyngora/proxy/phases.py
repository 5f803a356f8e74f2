"""``ProxyHttp``: the phases of a proxied request, with Pingora's names, order and defaults.

Subclass it and override the phases you need; ``upstream_peer`` is the only required one.
The engine (proxy/engine.py) looks, once per class, at which phases a subclass overrides and
calls only those: a phase left alone costs nothing on the request path. Phases may be written
``async def`` (the usual) or plain ``def``; the engine finds out once per class.

The order, for one request (Pingora's phase chart)::

    new_ctx -> early_request_filter -> request_filter -> proxy_upstream_filter
      -> upstream_peer -> [connect] -> connected_to_upstream | fail_to_connect (-> retry)
      -> upstream_request_filter -> request_body_filter* -> [send request, read response]
      -> upstream_response_filter -> response_filter
      -> upstream_response_body_filter* -> response_body_filter*
      (error_while_proxy on an error after connecting -> retry or fail_to_proxy)
      -> fail_to_proxy (on any error) -> logging (always, last)

``session`` is a :class:`pyngora.proxy.session.Session`; ``ctx`` is whatever ``new_ctx``
returned (one per request).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from pyngora import log
from pyngora.errors import Error, ErrorSource, ErrorType
from pyngora.headers import RequestHeader, ResponseHeader
from pyngora.upstreams.peer import HttpPeer

if TYPE_CHECKING:  # pragma: no cover
    from pyngora.proxy.session import Session

__all__ = ["ProxyHttp", "PHASES", "returned_error", "body_piece"]

# Every overridable phase, in the order they run.
PHASES = ("new_ctx", "early_request_filter", "request_filter", "proxy_upstream_filter",
          "upstream_peer", "connected_to_upstream", "fail_to_connect",
          "upstream_request_filter", "request_body_filter", "upstream_response_filter",
          "response_filter", "upstream_response_body_filter", "response_body_filter",
          "error_while_proxy", "fail_to_proxy", "logging", "request_summary")


class ProxyHttp:
    """The programmable proxy (Pingora's ``ProxyHttp`` trait). One instance serves every
    request of a worker: keep per-request state in ``ctx``, not on ``self``."""

    def new_ctx(self) -> Any:
        """Runs first, once per request: returns the per-request context handed to every other
        phase (default ``None``)."""
        return None

    async def early_request_filter(self, session: "Session", ctx: Any) -> None:
        """Runs right after the request head is read, before anything else (Pingora runs its
        modules here). Raise an Error to fail the request."""

    async def request_filter(self, session: "Session", ctx: Any) -> bool:
        """Runs before any upstream is chosen: validate, rate-limit, authenticate, answer from
        here. Return True when a response was already sent (``session.respond_error`` or
        ``write_response_header``...): the request is then done. False (default) = proxy it."""
        return False

    async def proxy_upstream_filter(self, session: "Session", ctx: Any) -> bool:
        """Runs after ``request_filter``: return False to not proxy (a 502 is sent unless the
        phase already answered). Default True."""
        return True

    async def upstream_peer(self, session: "Session", ctx: Any) -> HttpPeer:
        """Required. Returns the :class:`HttpPeer` to send this request to. Called again on
        every retry, so it can pick another backend."""
        raise NotImplementedError("ProxyHttp subclasses must implement upstream_peer")

    async def connected_to_upstream(self, session: "Session", reused: bool, peer: HttpPeer,
                                    ctx: Any) -> None:
        """Runs once a connection to ``peer`` is ready; ``reused``: it came from the pool."""

    async def fail_to_connect(self, session: "Session", peer: HttpPeer, ctx: Any,
                              e: Error) -> Error:
        """Runs when connecting to ``peer`` failed. Return the error (possibly changed:
        ``e.set_retry(True)`` asks for another try, which calls ``upstream_peer`` again).
        Connect errors are retryable by default, within ``max_retries``."""
        return e

    async def upstream_request_filter(self, session: "Session", upstream_request: RequestHeader,
                                      ctx: Any) -> None:
        """Runs before the request head is sent: edit ``upstream_request`` (a copy of the
        client's head, hop-by-hop fields removed) in place."""

    async def request_body_filter(self, session: "Session", body: Optional[bytes],
                                  end_of_stream: bool, ctx: Any) -> Optional[bytes]:
        """Runs for each piece of the request body on its way up (``body`` None with
        ``end_of_stream`` at the end). Returns the bytes to send instead (None = nothing).
        When overridden, the body goes upstream chunked (its length may change). A piece it
        was given by an attempt that then failed is given again to the retry's attempt (what
        it returned for a piece already sent is sent again as it was)."""
        return body

    async def upstream_response_filter(self, session: "Session",
                                       upstream_response: ResponseHeader, ctx: Any) -> None:
        """Runs when the upstream's response head arrives (hop-by-hop fields removed); edit
        it in place. (In Pingora this runs before caching; here there is no cache.)"""

    async def response_filter(self, session: "Session", upstream_response: ResponseHeader,
                              ctx: Any) -> None:
        """Runs right before the response head goes to the client; edit it in place."""

    async def upstream_response_body_filter(self, session: "Session", body: Optional[bytes],
                                            end_of_stream: bool, ctx: Any) -> Optional[bytes]:
        """Runs for each piece of the response body from the upstream. Returns the bytes to
        pass on (None = nothing). If it changes the length, remove Content-Length in a
        response filter (the body is then sent chunked)."""
        return body

    async def response_body_filter(self, session: "Session", body: Optional[bytes],
                                   end_of_stream: bool, ctx: Any) -> Optional[bytes]:
        """Runs for each piece of the response body right before it goes to the client.
        Returns the bytes to send (None = nothing)."""
        return body

    async def error_while_proxy(self, peer: HttpPeer, session: "Session", e: Error, ctx: Any,
                                client_reused: bool) -> Error:
        """Runs when an error happens after connecting (sending the request, reading the
        response). ``client_reused``: the upstream connection came from the pool. Return the
        error; ``e.retry`` (set when a pooled connection failed before any response byte)
        decides whether the request is tried again (never once the response has started, or
        for a non-idempotent request whose body was sent)."""
        return e

    async def fail_to_proxy(self, session: "Session", e: Error, ctx: Any) -> int:
        """Runs when the request failed for good. Sends an empty error response whose status
        is ``e.status`` (400 bad request, 502 bad gateway, 503 no upstream, 504 timeout...)
        unless the client is gone (status 0) or a response already started (then the
        connection is closed). Returns the status sent (0 = none)."""
        code = e.status
        if code > 0:
            await session.respond_error(code)
        else:
            session.abort()
        return code

    async def logging(self, session: "Session", e: Optional[Error], ctx: Any) -> None:
        """Runs last, always, once the request is over (successfully or not, ``e`` says)."""

    def request_summary(self, session: "Session", ctx: Any) -> str:
        """A one-line description of the request for error logs."""
        return session.request_summary()


# ---------------------------------------------------------------------- what phases return
# The engine's checks of what a user's phase returned, made where it is used (rare types are
# the only ones that pay for a call: the engine compares classes inline first).

def not_a_peer(peer: Any) -> Error:
    """The Error for what ``upstream_peer`` returned when it is no HttpPeer (the caller checks
    ``peer.__class__`` first, the cheap test): None is "no upstream peer" (502), anything
    else a bug in the phase (500), named in the log by its type."""
    if peer is None:
        return Error(ErrorType.NoUpstream, ErrorSource.Upstream, None, "no upstream peer")
    return Error(ErrorType.InternalError, ErrorSource.Internal, None,
                 f"upstream_peer returned {type(peer).__name__}, not an HttpPeer")


def returned_error(phase: str, returned: Any, e: Error) -> Error:
    """What ``fail_to_connect`` / ``error_while_proxy`` returned, as the Error to go on with:
    the one returned, or -- anything else, ``None`` above all (a forgotten ``return e``) --
    ``e`` itself, with an error log line saying so (the request then fails or is retried as
    ``e`` says: Pingora's default)."""
    if isinstance(returned, Error):
        return returned
    log.ERROR.error("%s returned %s, not an Error: going on with the error it was given (%s)",
                    phase, type(returned).__name__, e)
    return e


def body_piece(phase: str, data: Any) -> Optional[bytes]:
    """What a body filter returned, as bytes or None (a bytearray or memoryview is copied).
    Error (500) for anything else -- a str above all: its encoding is the filter's choice --
    raised before the piece reaches either connection."""
    if data is None or data.__class__ is bytes:
        return data  # type: ignore[no-any-return]
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    raise Error(ErrorType.InternalError, ErrorSource.Internal, None,
                f"{phase} returned {type(data).__name__}, not bytes or None")
