"""pyngora.errors: every error type's status for each source, the retry flag, the helpers."""
from __future__ import annotations

import pickle

import pytest

from pyngora.errors import NO_RESPONSE, Error, ErrorSource, ErrorType, status_for

T, S = ErrorType, ErrorSource

# The contract (SPEC section 7): 502 cannot connect / bad upstream, 503 no backend, 504 upstream
# timeouts, 400 malformed, 408/413/431 for their downstream causes.
UPSTREAM_504 = {T.ConnectTimedout, T.TLSHandshakeTimedout, T.ReadTimedout, T.WriteTimedout}
EXPECTED_UPSTREAM = {t: (504 if t in UPSTREAM_504 else 502) for t in T}
EXPECTED_UPSTREAM.update({T.NoUpstream: 503, T.RequestHeaderTimeout: 408, T.BodyTooLarge: 413,
                          T.HeadersTooLarge: 431, T.InternalError: 500})

DOWNSTREAM_GONE = {T.ReadError, T.WriteError, T.ConnectionClosed, T.WriteTimedout}
EXPECTED_DOWNSTREAM = {t: 400 for t in T}
EXPECTED_DOWNSTREAM.update({t: NO_RESPONSE for t in DOWNSTREAM_GONE})
EXPECTED_DOWNSTREAM.update({T.ReadTimedout: 408, T.NoUpstream: 503, T.RequestHeaderTimeout: 408,
                            T.BodyTooLarge: 413, T.HeadersTooLarge: 431, T.InternalError: 500})


@pytest.mark.parametrize("etype", list(T))
def test_status_upstream(etype: ErrorType) -> None:
    assert Error.new(etype, S.Upstream).status == EXPECTED_UPSTREAM[etype]


@pytest.mark.parametrize("etype", list(T))
def test_status_downstream(etype: ErrorType) -> None:
    assert Error.new(etype, S.Downstream).status == EXPECTED_DOWNSTREAM[etype]


@pytest.mark.parametrize("etype", list(T))
def test_status_internal_and_unset(etype: ErrorType) -> None:
    special = {T.NoUpstream: 503, T.RequestHeaderTimeout: 408, T.BodyTooLarge: 413,
               T.HeadersTooLarge: 431}
    for source in (S.Internal, S.Unset):
        assert Error.new(etype, source).status == special.get(etype, 500)
        assert status_for(etype, source) == special.get(etype, 500)


def test_http_status_and_override() -> None:
    assert Error.http_status(403).status == 403
    assert Error.new(T.HTTPStatus, status=418).status == 418
    err = Error.new_up(T.ConnectRefused)
    assert err.status == 502
    assert err.set_status(599) is err and err.status == 599


def test_contract_examples() -> None:
    assert Error.new_up(T.ConnectRefused).status == 502
    assert Error.new_up(T.ReadTimedout).status == 504
    assert Error.new_up(T.InvalidHTTPHeader).status == 502
    assert Error.new(T.NoUpstream).status == 503
    assert Error.new_down(T.InvalidHTTPHeader).status == 400
    assert Error.new_down(T.H1Error).status == 400


def test_retry_flag() -> None:
    err = Error.new_up(T.ConnectRefused)
    assert err.retry is False
    assert err.set_retry(True) is err and err.retry is True
    assert Error.new(T.ConnectionClosed, S.Upstream, retry=True).retry is True
    assert Error.new_up(T.ConnectTimedout, retry=True).retry is True


def test_sources_and_retagging() -> None:
    assert Error.new_up(T.ReadError).source is S.Upstream
    assert Error.new_down(T.ReadError).source is S.Downstream
    assert Error.new_in(T.InternalError).source is S.Internal
    assert Error.explain(T.InvalidHTTPHeader, "no host").source is S.Unset
    err = Error.explain(T.ReadTimedout, "slow")
    assert err.as_up().status == 504
    assert err.as_down().status == 408
    assert err.as_in().status == 500


def test_cause_context_and_text() -> None:
    cause = ConnectionRefusedError(111, "Connection refused")
    err = Error.because(T.ConnectRefused, "connect to 127.0.0.1:1", cause).as_up()
    assert err.cause is cause and err.__cause__ is cause
    assert err.context == "connect to 127.0.0.1:1"
    assert err.root_cause() is cause
    text = str(err)
    assert "ConnectRefused" in text and "Upstream" in text and "connect to 127.0.0.1:1" in text
    assert "refused" in text
    assert "HTTPStatus(404)" in str(Error.http_status(404))
    assert "ConnectRefused" in repr(err)
    inner = Error.new_up(T.ReadError, "inner", cause)
    outer = Error.because(T.H1Error, "outer", inner)
    assert outer.root_cause() is cause


def test_is_an_exception_and_picklable() -> None:
    with pytest.raises(Error) as info:
        raise Error.new_up(T.ConnectTimedout, "slow", retry=True)
    assert info.value.etype is T.ConnectTimedout
    copy = pickle.loads(pickle.dumps(Error.new_up(T.ReadTimedout, "x", retry=True)))
    assert copy.etype is T.ReadTimedout and copy.retry and copy.status == 504
    assert pickle.loads(pickle.dumps(Error.http_status(451))).status == 451
