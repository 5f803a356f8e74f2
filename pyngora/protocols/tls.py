"""Server TLS: the SSLContext of a listener, and the ``-t`` checks of its certificates.

``server_context(tls)`` runs in each worker when it builds its listeners; ``check_tls(tls)``
(``tls_problems``) runs for ``pyngora -t`` and before a start or a reload is accepted.
Workers load the bytes the master checked (``config/pem_store.py``): certificates are
re-read on every reload and upgrade, and a worker restarted in between serves the same ones
as its siblings even when the files changed (or broke) meanwhile. Modern defaults: TLS 1.2 and 1.3 only, AEAD ciphers with forward secrecy
(Mozilla's "intermediate" profile), no compression, no renegotiation, ALPN from the listener
(``h2``, ``http/1.1``), and SNI choosing among several certificates, the first (``cert``/
``key``) being the default for unknown or absent names.
"""
from __future__ import annotations

import datetime
import os
from typing import TYPE_CHECKING, Any, Optional, Union

from pyngora.config import pem_store

if TYPE_CHECKING:  # pragma: no cover
    import ssl  # (imported where used: ``remember`` runs in the master, which loads no ssl)

__all__ = ["server_context", "check_tls", "tls_problems", "cert_validity", "CIPHERS"]

# Mozilla intermediate (TLS 1.2 part; TLS 1.3 suites are always on and already modern).
CIPHERS = ("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
           "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
           "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
           "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384")
_KNOWN_ALPN = ("h2", "http/1.1")


def _no_password() -> bytes:
    # An encrypted key must fail to load, never prompt on a terminal (OpenSSL's default).
    return b""


def _load_pair(ctx: ssl.SSLContext, cert: str, key: str) -> None:
    """Load ``cert``/``key`` into ``ctx``: the checked bytes when there are some (see
    ``pem_store``), else the files. Raises ssl.SSLError or OSError naming both files."""
    import ssl
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
    import ssl
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
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
    import ssl
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
    import ssl
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
