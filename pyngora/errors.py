"""Errors: one exception type for the whole request path, in the style of ``pingora-error``.

An :class:`Error` has a *type* (what went wrong: ``ConnectRefused``, ``ReadTimedout``...), a
*source* (whose fault: the upstream, the downstream client, or ourselves), a *retry* flag (is it
safe to try the request again, possibly on another peer) and an optional *cause* (the lower-level
exception) and *context* (a human explanation for the error log).

The HTTP status a failed request is answered with is decided here, once, by a table lookup on
``(etype, source)`` then on ``source`` alone; no ``isinstance`` ladders on the request path.

This module is a leaf: it imports only the standard library.
"""
from __future__ import annotations

import enum
from typing import Optional


class ErrorType(enum.Enum):
    """What went wrong. Names follow Pingora's ``ErrorType`` (plus a few pyngora needs)."""

    # Connecting to an upstream.
    ConnectTimedout = "ConnectTimedout"
    ConnectRefused = "ConnectRefused"
    ConnectNoRoute = "ConnectNoRoute"
    ConnectError = "ConnectError"
    TLSHandshakeFailure = "TLSHandshakeFailure"
    TLSHandshakeTimedout = "TLSHandshakeTimedout"
    InvalidCert = "InvalidCert"
    BindError = "BindError"
    AcceptError = "AcceptError"
    SocketError = "SocketError"
    # I/O on an established connection.
    ReadTimedout = "ReadTimedout"
    WriteTimedout = "WriteTimedout"
    ReadError = "ReadError"
    WriteError = "WriteError"
    ConnectionClosed = "ConnectionClosed"
    # Protocol.
    InvalidHTTPHeader = "InvalidHTTPHeader"
    H1Error = "H1Error"
    H2Error = "H2Error"
    InvalidH2 = "InvalidH2"
    # Downstream request problems that have their own status (pyngora additions).
    RequestHeaderTimeout = "RequestHeaderTimeout"  # 408
    BodyTooLarge = "BodyTooLarge"  # 413
    HeadersTooLarge = "HeadersTooLarge"  # 431
    # An explicit status chosen by the user (``Error.new(HTTPStatus, status=403)``).
    HTTPStatus = "HTTPStatus"
    # No healthy backend to send the request to.
    NoUpstream = "NoUpstream"
    # Everything else.
    FileOpenError = "FileOpenError"
    InternalError = "InternalError"
    UnknownError = "UnknownError"
    Custom = "Custom"

    def __repr__(self) -> str:
        return self.value


class ErrorSource(enum.Enum):
    """Whose fault it is: decides the default status and where the error is reported."""

    Upstream = "Upstream"
    Downstream = "Downstream"
    Internal = "Internal"
    Unset = "Unset"

    def __repr__(self) -> str:
        return self.value


# Status code meaning "no response can be sent": the downstream client is gone (Pingora uses 0
# in ``fail_to_proxy`` for this case). A caller seeing 0 closes the connection without writing.
NO_RESPONSE = 0

_T = ErrorType
_S = ErrorSource

# (etype, source) -> status. Checked first.
_STATUS_BY_TYPE_AND_SOURCE: dict[tuple[ErrorType, ErrorSource], int] = {
    # Upstream timeouts are gateway timeouts.
    (_T.ConnectTimedout, _S.Upstream): 504,
    (_T.TLSHandshakeTimedout, _S.Upstream): 504,
    (_T.ReadTimedout, _S.Upstream): 504,
    (_T.WriteTimedout, _S.Upstream): 504,
    # The client is gone or stalled: nothing useful can be written back.
    (_T.ReadError, _S.Downstream): NO_RESPONSE,
    (_T.WriteError, _S.Downstream): NO_RESPONSE,
    (_T.ConnectionClosed, _S.Downstream): NO_RESPONSE,
    (_T.WriteTimedout, _S.Downstream): NO_RESPONSE,
    # A client that takes too long to send its request head / body.
    (_T.ReadTimedout, _S.Downstream): 408,
}

# etype -> status whatever the source. Checked second.
_STATUS_BY_TYPE: dict[ErrorType, int] = {
    _T.NoUpstream: 503,
    _T.RequestHeaderTimeout: 408,
    _T.BodyTooLarge: 413,
    _T.HeadersTooLarge: 431,
    _T.InternalError: 500,
}

# source -> status. The fallback, as Pingora's default ``fail_to_proxy``.
_STATUS_BY_SOURCE: dict[ErrorSource, int] = {
    _S.Upstream: 502,
    _S.Downstream: 400,
    _S.Internal: 500,
    _S.Unset: 500,
}


def status_for(etype: ErrorType, source: ErrorSource) -> int:
    """The HTTP status a request failing with ``etype`` from ``source`` is answered with.

    Called by :attr:`Error.status` (and usable without an Error). 0 (:data:`NO_RESPONSE`) means
    the downstream client is gone and nothing should be written.
    """
    code = _STATUS_BY_TYPE_AND_SOURCE.get((etype, source))
    if code is not None:
        return code
    code = _STATUS_BY_TYPE.get(etype)
    if code is not None:
        return code
    return _STATUS_BY_SOURCE[source]


class Error(Exception):
    """The one exception of the request path (Pingora's ``Error``).

    ``retry`` says whether the failed attempt may safely be repeated: set by the code that knows
    (the connector: a connect failure, or a reused pooled connection closed before any response
    byte), and changeable by ``fail_to_connect`` / ``error_while_proxy`` via :meth:`set_retry`.
    """

    __slots__ = ("etype", "source", "retry", "cause", "context", "_status")

    def __init__(self, etype: ErrorType, source: ErrorSource = ErrorSource.Unset,
                 cause: Optional[BaseException] = None, context: str = "",
                 retry: bool = False, status: Optional[int] = None) -> None:
        super().__init__(etype, context)
        self.etype = etype
        self.source = source
        self.retry = retry
        self.cause = cause
        self.context = context
        # An explicit status (HTTPStatus, or a user override); None = decided by the table.
        self._status = status
        if cause is not None:
            self.__cause__ = cause

    # --- constructors (Pingora's names) ---------------------------------------------------

    @classmethod
    def new(cls, etype: ErrorType, source: ErrorSource = ErrorSource.Unset,
            cause: Optional[BaseException] = None, context: str = "",
            retry: bool = False, status: Optional[int] = None) -> "Error":
        """Build an error; ``status`` is required for (and mostly used with) ``HTTPStatus``."""
        return cls(etype, source, cause, context, retry, status)

    @classmethod
    def new_up(cls, etype: ErrorType, context: str = "", cause: Optional[BaseException] = None,
               retry: bool = False) -> "Error":
        """An error caused by the upstream (Pingora's ``Error::new_up``)."""
        return cls(etype, ErrorSource.Upstream, cause, context, retry)

    @classmethod
    def new_down(cls, etype: ErrorType, context: str = "",
                 cause: Optional[BaseException] = None) -> "Error":
        """An error caused by the downstream client (Pingora's ``Error::new_down``)."""
        return cls(etype, ErrorSource.Downstream, cause, context)

    @classmethod
    def new_in(cls, etype: ErrorType, context: str = "",
               cause: Optional[BaseException] = None) -> "Error":
        """An internal error (Pingora's ``Error::new_in``)."""
        return cls(etype, ErrorSource.Internal, cause, context)

    @classmethod
    def explain(cls, etype: ErrorType, context: str) -> "Error":
        """An error with a context string and no cause (Pingora's ``Error::explain``)."""
        return cls(etype, ErrorSource.Unset, None, context)

    @classmethod
    def because(cls, etype: ErrorType, context: str, cause: BaseException) -> "Error":
        """Wrap ``cause`` (Pingora's ``Error::because``)."""
        return cls(etype, ErrorSource.Unset, cause, context)

    @classmethod
    def http_status(cls, status: int, context: str = "") -> "Error":
        """Answer the request with ``status`` (Pingora's ``Error::new(HTTPStatus(code))``)."""
        return cls(ErrorType.HTTPStatus, ErrorSource.Internal, None, context, False, status)

    # --- queries and setters ---------------------------------------------------------------

    @property
    def status(self) -> int:
        """The HTTP status to answer with: the explicit one if set, else the table's."""
        if self._status is not None:
            return self._status
        return status_for(self.etype, self.source)

    def set_retry(self, retry: bool) -> "Error":
        """Mark the error (un)safe to retry; returns self for chaining."""
        self.retry = retry
        return self

    def set_status(self, status: int) -> "Error":
        """Override the status the request is answered with; returns self."""
        self._status = status
        return self

    def as_up(self) -> "Error":
        """Re-tag the error as the upstream's fault (Pingora's ``as_up``); returns self."""
        self.source = ErrorSource.Upstream
        return self

    def as_down(self) -> "Error":
        """Re-tag the error as the downstream's fault; returns self."""
        self.source = ErrorSource.Downstream
        return self

    def as_in(self) -> "Error":
        """Re-tag the error as internal; returns self."""
        self.source = ErrorSource.Internal
        return self

    def root_cause(self) -> BaseException:
        """The innermost cause in the chain (self if there is none)."""
        err: BaseException = self
        for _ in range(32):  # bounded: a cycle in causes must not hang the error path
            nxt = err.cause if isinstance(err, Error) else err.__cause__
            if nxt is None:
                break
            err = nxt
        return err

    def __str__(self) -> str:
        parts = [self.etype.value]
        if self.etype is ErrorType.HTTPStatus and self._status is not None:
            parts[0] = f"HTTPStatus({self._status})"
        parts.append(f"context: {self.context}" if self.context else "")
        text = " ".join(p for p in parts if p)
        text = f"{self.source.value} {text}" if self.source is not ErrorSource.Unset else text
        if self.cause is not None:
            text += f" cause: {self.cause!s}" if str(self.cause) else f" cause: {self.cause!r}"
        return text

    def __repr__(self) -> str:
        return (f"Error({self.etype.value}, {self.source.value}, retry={self.retry}, "
                f"context={self.context!r}, cause={self.cause!r})")

    def __reduce__(self):  # type: ignore[no-untyped-def]
        # Picklable (for logging across processes): rebuild from the constructor arguments.
        return (Error, (self.etype, self.source, self.cause, self.context, self.retry,
                        self._status))


__all__ = ["ErrorType", "ErrorSource", "Error", "status_for", "NO_RESPONSE"]
