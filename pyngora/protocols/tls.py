"""Server TLS: the SSLContext of a listener, and the ``-t`` checks of its certificates.

``server_context(tls)`` runs in each worker when it builds its listeners; ``check_tls(tls)``
(``tls_problems``) runs for ``pyngora -t`` and before a start or a reload is accepted.
Workers load the bytes the master checked (``config/pem_store.py``): certificates are
re-read on every reload and upgrade, and a worker restarted in between serves the same ones
as its siblings even when the files changed (or broke) meanwhile. Modern defaults: TLS 1.2 and 1.3 only, AEAD ciphers with forward secrecy
(Mozilla's "intermediate" profile), no compression, no renegotiation, ALPN from the listener
(``h2``, ``http/1.1``), and SNI choosing among several certificates, the first (``cert``/
``key``) being the default for unknown or absent names.

A handshake that fails is answered before the connection ends (``ListenerSSLObject``): a
client that speaks plain HTTP to the TLS port gets nginx's ``400`` in plain text, and one that
OpenSSL turns away with an alert (TLS 1.0/1.1 only: ``protocol_version``) gets that alert.
"""
from __future__ import annotations

import datetime
import os
import ssl  # (workers and the check child load this module; the master never does)
from typing import Any, Optional, Union, cast

from pyngora.config import pem_store

__all__ = ["server_context", "check_tls", "tls_problems", "cert_validity", "CIPHERS",
           "ListenerContext", "ListenerSSLObject", "PLAIN_HTTP_RESPONSE"]

# Mozilla intermediate (TLS 1.2 part; TLS 1.3 suites are always on and already modern).
CIPHERS = ("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
           "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
           "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
           "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384")
_KNOWN_ALPN = ("h2", "http/1.1")

# The answer to plain HTTP on a TLS port (``curl http://host:443/``): nginx's 400 and its
# words, as text. Empty-bodied errors elsewhere carry the same Cache-Control.
_PLAIN_HTTP_BODY = b"The plain HTTP request was sent to HTTPS port\n"
PLAIN_HTTP_RESPONSE = (b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\n"
                       b"Content-Length: %d\r\nCache-Control: private, no-store\r\n"
                       b"Connection: close\r\n\r\n%s" % (len(_PLAIN_HTTP_BODY), _PLAIN_HTTP_BODY))
# OpenSSL's reasons for a first record that is not TLS: GET/POST/HEAD/PUT, CONNECT, and any
# other bytes whose "version" is not 3.x (DELETE, OPTIONS, PRI, binary junk). It sends no
# alert for these (ssl3_get_record: "doesn't look like TLS").
_NOT_TLS = frozenset(("HTTP_REQUEST", "HTTPS_PROXY_REQUEST", "WRONG_VERSION_NUMBER"))
_ALERTED, _PLAIN = 1, 2


class ListenerSSLObject(ssl.SSLObject):
    """A listener's TLS connection (the event loop's TLS protocol drives it through memory
    BIOs; ``ListenerContext.wrap_bio`` makes it).

    uvloop (and asyncio's own sslproto) end a failed handshake at once without sending what
    OpenSSL wrote for the client: the ``protocol_version`` alert a TLS 1.1 client should get
    was dropped, and plain HTTP got a silent close (curl: "Empty reply from server"). So a
    failure that has something to say reports "want read" once instead: the loop sends the
    outgoing BIO as it does after every handshake step, and the connection ends when the
    client closes (it got an alert, or a 400 with ``Connection: close``) or sends more after
    an alert, else at the handshake timeout, which still bounds the whole connection. A
    failure with nothing to say fails as before."""

    __slots__ = ("_in", "_out", "_refused", "_failure")
    _in: ssl.MemoryBIO
    _out: ssl.MemoryBIO
    _refused: int
    _failure: Optional[ssl.SSLError]

    def do_handshake(self) -> None:
        """One handshake step, each time bytes came (the loop's TLS protocol calls it).
        Raises SSLWantReadError until the handshake is done, an SSLError when it failed."""
        if self._refused:
            self._refused_again()
        try:
            self._sslobj.do_handshake()
        except ssl.SSLWantReadError:
            raise
        except ssl.SSLError as exc:
            self._refuse(exc)

    def _refuse(self, exc: ssl.SSLError) -> None:
        """The handshake just failed with ``exc`` (runs once per connection): raises ``exc``
        when there is nothing to tell the client, else SSLWantReadError, the alert or the 400
        being in the outgoing BIO for the loop to send."""
        out = self._out
        if not out.pending:
            # No alert: plain text sent to TLS, or a failure with nothing to say. (No
            # ClientHello was read, so no TLS byte went out that the 400 would follow: a
            # TLS 1.2 client's alert record of another version, after our first flight, is
            # also WRONG_VERSION_NUMBER without an alert.)
            if exc.reason not in _NOT_TLS or self._sslobj.shared_ciphers() is not None:
                raise exc
            self._in.read()  # the rest of the request: never parsed, never passed on
            out.write(PLAIN_HTTP_RESPONSE)
            self._refused = _PLAIN
            metrics = getattr(self.context, "service_metrics", None)
            if metrics is not None:  # counted as a malformed request is (HttpApp._send_error)
                metrics.connection_opened()
                metrics.request_done(400, 0.0, 0, len(_PLAIN_HTTP_BODY))
                metrics.connection_closed()
        else:
            self._refused = _ALERTED
            self._failure = exc
        raise ssl.SSLWantReadError("handshake failed: sending the client what OpenSSL wrote")

    def _refused_again(self) -> None:
        """A step after ``_refuse``: an alerted client that still sends fails the handshake
        for good (the connection closes); after the 400, what the client sends is dropped, so
        the close that ends the connection is a FIN, not a reset that destroys the answer."""
        if self._refused == _PLAIN:
            self._in.read()
            raise ssl.SSLWantReadError("plain HTTP answered: waiting for the client's close")
        raise self._failure or ssl.SSLError("handshake failed")


class ListenerContext(ssl.SSLContext):
    """A TLS listener's SSLContext: its connections are ``ListenerSSLObject`` s.
    ``service_metrics`` (the worker sets it; a ServiceMetrics) counts the 400s of plain HTTP."""

    sslobject_class = ListenerSSLObject
    service_metrics: Any = None

    def wrap_bio(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO,  # type: ignore[override]
                 server_side: bool = False, server_hostname: Optional[str] = None,
                 session: Optional[ssl.SSLSession] = None) -> ListenerSSLObject:
        """A new connection's TLS object (the loop calls this once per connection)."""
        obj = cast(ListenerSSLObject, super().wrap_bio(incoming, outgoing, server_side,
                                                       server_hostname, session))
        obj._in = incoming
        obj._out = outgoing
        obj._refused = 0
        obj._failure = None
        return obj


def _no_password() -> bytes:
    # An encrypted key must fail to load, never prompt on a terminal (OpenSSL's default).
    return b""


def _load_pair(ctx: ssl.SSLContext, cert: str, key: str) -> None:
    """Load ``cert``/``key`` into ``ctx``: the checked bytes when there are some (see
    ``pem_store``), else the files. Raises ssl.SSLError or OSError naming both files."""
    pem = pem_store.checked(cert, key)
    try:
        if pem is None or not _load_pem(ctx, pem[0], pem[1]):
            ctx.load_cert_chain(cert, key, password=_no_password)
    except ssl.SSLError as exc:
        # OpenSSL's own message ("[SSL] PEM lib") names no file: the error log must.
        raise ssl.SSLError(f"cannot load certificate {cert} / key {key}: "
                           f"{exc.reason or exc}") from None
    except OSError as exc:
        raise OSError(exc.errno, f"cannot load certificate {cert} / key {key}: "
                                 f"{exc.strerror or exc}") from None


def _load_pem(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> bool:
    """Load PEM bytes into ``ctx`` through anonymous in-memory files (memfd: the key never
    touches a disk). Returns False where memfd is not available (the caller reads the files);
    raises ssl.SSLError if the bytes do not load."""
    create = getattr(os, "memfd_create", None)
    if create is None or not os.path.isdir("/proc/self/fd"):
        return False
    fds: list[int] = []
    try:
        for data in (cert_pem, key_pem):
            fd = create("pyngora-tls", getattr(os, "MFD_CLOEXEC", 0))
            fds.append(fd)
            os.write(fd, data)
    except OSError:
        for fd in fds:
            os.close(fd)
        return False
    try:
        ctx.load_cert_chain(f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}",
                            password=_no_password)
    finally:
        for fd in fds:
            os.close(fd)
    return True


def _base_context(cert: str, key: str, alpn: tuple[str, ...]) -> ssl.SSLContext:
    ctx = ListenerContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= (ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
                    | getattr(ssl, "OP_NO_RENEGOTIATION", 0))
    ctx.set_ciphers(CIPHERS)
    _load_pair(ctx, cert, key)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def _match(pattern: str, name: str) -> bool:
    """``*.example.com`` matches exactly one label (RFC 6125 6.4.3); otherwise equality."""
    if pattern.startswith("*."):
        head, dot, rest = name.partition(".")
        return bool(dot and head) and rest == pattern[2:]
    return pattern == name


def server_context(tls: Any) -> ssl.SSLContext:
    """The SSLContext for a listener's ``tls`` (a TlsConf: cert, key, alpn, sni). Raises
    OSError/ssl.SSLError when a file cannot be loaded (``check_tls`` says why first)."""
    alpn = tuple(getattr(tls, "alpn", ()) or ())
    ctx = _base_context(tls.cert, tls.key, alpn)
    sni = tuple(getattr(tls, "sni", ()) or ())
    if sni:
        exact: dict[str, ssl.SSLContext] = {}
        wild: list[tuple[str, ssl.SSLContext]] = []
        for entry in sni:
            sub = _base_context(entry.cert, entry.key, alpn)
            name = entry.server_name.lower().rstrip(".")
            if name.startswith("*."):
                wild.append((name, sub))
            else:
                exact.setdefault(name, sub)

        def pick(sslobj: ssl.SSLObject, server_name: Optional[str],
                 _ctx: ssl.SSLContext) -> None:
            # Runs during the handshake; returning None continues it. An unknown or missing
            # name keeps the default certificate (what nginx does with its default server).
            if not server_name:
                return None
            name = server_name.lower().rstrip(".")
            chosen = exact.get(name)
            if chosen is None:
                for pattern, sub in wild:
                    if _match(pattern, name):
                        chosen = sub
                        break
            if chosen is not None:
                sslobj.context = chosen
            return None

        ctx.sni_callback = pick  # type: ignore[assignment]
    return ctx


# --------------------------------------------------------------------------- -t checks
def _der_items(data: bytes, pos: int, end: int) -> list[tuple[int, int, int]]:
    """(tag, start of content, end of content) of each DER element in data[pos:end]."""
    out = []
    while pos < end:
        tag = data[pos]
        length = data[pos + 1]
        pos += 2
        if length & 0x80:
            n = length & 0x7F
            length = int.from_bytes(data[pos:pos + n], "big")
            pos += n
        out.append((tag, pos, pos + length))
        pos += length
    return out


def _der_time(tag: int, raw: bytes) -> datetime.datetime:
    text = raw.decode("ascii").rstrip("Z")
    if tag == 0x17:  # UTCTime YYMMDDHHMMSS
        year = int(text[:2])
        year += 2000 if year < 50 else 1900
        text = str(year) + text[2:]
    return datetime.datetime.strptime(text[:14], "%Y%m%d%H%M%S").replace(
        tzinfo=datetime.timezone.utc)


def cert_validity(pem_path: str) -> tuple[datetime.datetime, datetime.datetime]:
    """(notBefore, notAfter) of the first certificate in a PEM file (ValueError if none)."""
    with open(pem_path, "r", encoding="ascii", errors="replace") as f:
        return _validity(f.read())


def _validity(text: str) -> tuple[datetime.datetime, datetime.datetime]:
    """(notBefore, notAfter) of the first certificate in PEM ``text`` (ValueError if none)."""
    begin = text.find("-----BEGIN CERTIFICATE-----")
    if begin < 0:
        raise ValueError("no PEM certificate found")
    end = text.find("-----END CERTIFICATE-----", begin)
    if end < 0:
        raise ValueError("truncated PEM certificate")
    der = ssl.PEM_cert_to_DER_cert(text[begin:end + 25])
    try:
        (_, c0, c1), = _der_items(der, 0, len(der))[:1]
        tbs = _der_items(der, c0, c1)[0]
        fields = _der_items(der, tbs[1], tbs[2])
        if fields and fields[0][0] == 0xA0:  # [0] version
            fields = fields[1:]
        validity = fields[3]  # serialNumber, signature, issuer, validity
        (t0, a0, b0), (t1, a1, b1) = _der_items(der, validity[1], validity[2])[:2]
        return _der_time(t0, der[a0:b0]), _der_time(t1, der[a1:b1])
    except (IndexError, ValueError) as exc:
        raise ValueError(f"cannot read the certificate's validity: {exc}") from None


# A problem with a listener's ``tls``: the key path under ``tls`` (("cert",), ("sni", 0,
# "key"), ...; () for the pair as a whole) and what is wrong there.
Problem = tuple[tuple[Union[str, int], ...], str]


def _check_pair(cert: str, key: str, now: datetime.datetime) -> list[Problem]:
    errors: list[Problem] = []
    for label, field, path in (("certificate", "cert", cert), ("key", "key", key)):
        if not path:
            errors.append(((field,), f"no {label} file given"))
        elif os.path.isdir(path):
            errors.append(((field,), f"{label} file {path} is a directory"))
        elif not os.path.isfile(path):
            errors.append(((field,), f"{label} file {path} does not exist"))
        elif not os.access(path, os.R_OK):
            errors.append(((field,), f"{label} file {path} is not readable"))
    if errors:
        return errors
    try:
        # The bytes checked are the bytes kept: those ``stage`` read before this check, else
        # each file read once here, so one replaced between the checks and the load cannot
        # slip through.
        pem = pem_store.staged(cert, key)
        if pem is None:
            with open(cert, "rb") as f:
                cert_pem = f.read()
            with open(key, "rb") as f:
                key_pem = f.read()
        else:
            cert_pem, key_pem = pem
        not_before, not_after = _validity(cert_pem.decode("ascii", "replace"))
    except (OSError, ValueError) as exc:
        return [(("cert",), f"certificate {cert}: {exc}")]
    if not_after < now:
        errors.append(((), f"certificate {cert} expired on {not_after:%Y-%m-%d %H:%M:%S} UTC"))
    elif not_before > now:
        errors.append(((), f"certificate {cert} is not valid before "
                           f"{not_before:%Y-%m-%d %H:%M:%S} UTC"))
    try:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        if not _load_pem(ctx, cert_pem, key_pem):
            ctx.load_cert_chain(cert, key, password=_no_password)
    except ssl.SSLError as exc:
        reason = str(getattr(exc, "reason", "") or exc)
        if "KEY_VALUES_MISMATCH" in reason.upper() or "mismatch" in reason.lower():
            errors.append(((), f"key {key} does not match certificate {cert}"))
        elif "BAD_DECRYPT" in reason.upper() or "decrypt" in reason.lower():
            errors.append((("key",), f"key {key} is encrypted (pyngora needs an unencrypted key)"))
        else:
            errors.append(((), f"cannot load {cert} / {key}: {exc}"))
    except OSError as exc:
        errors.append(((), f"cannot load {cert} / {key}: {exc}"))
    return errors


def tls_problems(tls: Any, now: Optional[datetime.datetime] = None) -> list[Problem]:
    """Every problem with a listener's ``tls`` (empty list = fine), each at its key: missing
    or unreadable files, a key that does not match its certificate, an expired (or not yet
    valid) certificate, an unknown ALPN protocol."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    errors = _check_pair(tls.cert, tls.key, now)
    for i, entry in enumerate(tuple(getattr(tls, "sni", ()) or ())):
        errors += [(("sni", i) + sub, f"({entry.server_name}) {message}")
                   for sub, message in _check_pair(entry.cert, entry.key, now)]
    for proto in tuple(getattr(tls, "alpn", ()) or ()):
        if proto not in _KNOWN_ALPN:
            errors.append((("alpn",), f"unknown protocol {proto!r} (use h2, http/1.1)"))
    return errors


def check_tls(tls: Any, where: str = "tls", now: Optional[datetime.datetime] = None) -> list[str]:
    """``tls_problems`` as lines, each prefixed with ``where`` and its key path."""
    return [where + "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in sub)
            + f": {message}" for sub, message in tls_problems(tls, now)]
