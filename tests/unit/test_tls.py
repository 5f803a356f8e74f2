"""protocols/tls.py: the listener SSLContext (TLS 1.2+, ALPN, SNI) and the ``-t`` checks.

Certificates are made in the test with the ``openssl`` CLI; handshakes run over a real
socketpair (server side in a thread)."""
from __future__ import annotations

import datetime
import shutil
import socket
import ssl
import subprocess
import threading
from pathlib import Path

import pytest

from pyngora.config.schema import SniCert, TlsConf
from pyngora.protocols.tls import cert_validity, check_tls, server_context
from tests.support import self_signed_cert

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI missing")


def _run(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str]]:
    d = tmp_path_factory.mktemp("certs")
    out = {n: self_signed_cert(d, n) for n in ("default.test", "a.test", "wild.test")}
    # An expired certificate: signed by a throwaway CA with dates in the past.
    ca_cert, ca_key = self_signed_cert(d, "ca.test", days=10)
    _run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "old.key", "-out", "old.csr",
         "-subj", "/CN=old.test", cwd=d)
    (d / "index.txt").write_text("")
    (d / "serial").write_text("01\n")
    (d / "ca.cnf").write_text("[ca]\ndefault_ca = d\n[d]\ndatabase = index.txt\n"
                              "new_certs_dir = .\nserial = serial\ndefault_md = sha256\n"
                              "policy = p\nunique_subject = no\n[p]\ncommonName = supplied\n")
    _run("ca", "-batch", "-config", "ca.cnf", "-cert", ca_cert, "-keyfile", ca_key,
         "-in", "old.csr", "-out", "old.pem", "-startdate", "20200101000000Z",
         "-enddate", "20200201000000Z", "-notext", cwd=d)
    out["old.test"] = (str(d / "old.pem"), str(d / "old.key"))
    return out


def _handshake(ctx: ssl.SSLContext, server_name: str | None,
               alpn: list[str] | None = None) -> tuple[bytes, str | None, str | None]:
    """(server certificate DER, negotiated ALPN, TLS version) seen by a client."""
    a, b = socket.socketpair()
    a.settimeout(20)
    b.settimeout(20)
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            with ctx.wrap_socket(a, server_side=True) as s:
                s.recv(1)
        except (OSError, ssl.SSLError) as exc:
            errors.append(exc)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        cctx.check_hostname = False
        cctx.verify_mode = ssl.CERT_NONE
        if alpn:
            cctx.set_alpn_protocols(alpn)
        with cctx.wrap_socket(b, server_hostname=server_name) as c:
            der = c.getpeercert(binary_form=True)
            result = (der, c.selected_alpn_protocol(), c.version())
            c.sendall(b"x")
    finally:
        t.join(20)
        a.close()
        b.close()
    assert not errors, errors
    assert der is not None
    return result


def _der(pem_path: str) -> bytes:
    return ssl.PEM_cert_to_DER_cert(Path(pem_path).read_text())


def _conf(certs, alpn=("h2", "http/1.1")) -> TlsConf:
    cert, key = certs["default.test"]
    return TlsConf(cert=cert, key=key, alpn=alpn, sni=(
        SniCert("a.test", *certs["a.test"]), SniCert("*.wild.test", *certs["wild.test"])))


def test_sni_picks_the_certificate_and_unknown_names_get_the_default(certs) -> None:
    ctx = server_context(_conf(certs))
    assert _handshake(ctx, "a.test")[0] == _der(certs["a.test"][0])
    assert _handshake(ctx, "A.TEST")[0] == _der(certs["a.test"][0])
    assert _handshake(ctx, "x.wild.test")[0] == _der(certs["wild.test"][0])
    # one label only for a wildcard, and unknown names: the default certificate
    assert _handshake(ctx, "a.b.wild.test")[0] == _der(certs["default.test"][0])
    assert _handshake(ctx, "nobody.test")[0] == _der(certs["default.test"][0])
    assert _handshake(ctx, None)[0] == _der(certs["default.test"][0])


def test_alpn_and_modern_versions(certs) -> None:
    ctx = server_context(_conf(certs))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    _, proto, version = _handshake(ctx, "a.test", ["h2", "http/1.1"])
    assert proto == "h2"  # the SNI-chosen context negotiates ALPN too
    assert version in ("TLSv1.2", "TLSv1.3")
    assert _handshake(ctx, "nobody.test", ["http/1.1"])[1] == "http/1.1"
    ctx1 = server_context(_conf(certs, alpn=("http/1.1",)))
    assert _handshake(ctx1, "nobody.test", ["h2", "http/1.1"])[1] == "http/1.1"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_tls_1_1_client_is_refused(certs) -> None:
    ctx = server_context(_conf(certs))
    a, b = socket.socketpair()
    a.settimeout(20)
    b.settimeout(20)
    t = threading.Thread(target=lambda: _swallow(ctx, a), daemon=True)
    t.start()
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.check_hostname = False
    cctx.verify_mode = ssl.CERT_NONE
    try:
        cctx.minimum_version = ssl.TLSVersion.TLSv1
        cctx.maximum_version = ssl.TLSVersion.TLSv1_1
    except (ValueError, ssl.SSLError):
        pytest.skip("this OpenSSL cannot even offer TLS 1.1")
    try:
        with pytest.raises((ssl.SSLError, OSError)):
            cctx.wrap_socket(b, server_hostname="a.test")
    finally:
        t.join(20)
        a.close()
        b.close()


def _swallow(ctx: ssl.SSLContext, sock: socket.socket) -> None:
    try:
        ctx.wrap_socket(sock, server_side=True)
    except (OSError, ssl.SSLError):
        pass


def test_check_tls_accepts_a_good_configuration(certs) -> None:
    assert check_tls(_conf(certs)) == []
    nb, na = cert_validity(certs["old.test"][0])
    assert (nb.year, na.year, na.month) == (2020, 2020, 2)


def test_check_tls_flags_expired_mismatched_missing_and_unknown_alpn(certs, tmp_path) -> None:
    old_cert, old_key = certs["old.test"]
    errs = check_tls(TlsConf(cert=old_cert, key=old_key))
    assert len(errs) == 1 and "expired on 2020-02-01" in errs[0]

    errs = check_tls(TlsConf(cert=certs["a.test"][0], key=certs["default.test"][1]))
    assert len(errs) == 1 and "does not match" in errs[0]

    errs = check_tls(TlsConf(cert=str(tmp_path / "nope.pem"), key=certs["a.test"][1]))
    assert len(errs) == 1 and "does not exist" in errs[0]

    garbage = tmp_path / "garbage.pem"
    garbage.write_text("hello\n")
    errs = check_tls(TlsConf(cert=str(garbage), key=certs["a.test"][1]))
    assert len(errs) == 1 and "no PEM certificate" in errs[0]

    cert, key = certs["default.test"]
    errs = check_tls(TlsConf(cert=cert, key=key, alpn=("h2", "spdy/3"), sni=(
        SniCert("old.test", old_cert, old_key),)))
    assert len(errs) == 2
    assert "tls.sni[0]: (old.test)" in errs[0] and "expired" in errs[0]
    assert "spdy/3" in errs[1]


def test_check_tls_not_yet_valid_and_clock(certs) -> None:
    cert, key = certs["a.test"]
    later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=30)
    assert "expired" in check_tls(TlsConf(cert=cert, key=key), now=later)[0]
    earlier = datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc)
    assert "not valid before" in check_tls(TlsConf(cert=cert, key=key), now=earlier)[0]


def test_encrypted_key_is_an_error_not_a_prompt(certs, tmp_path) -> None:
    cert, key = certs["a.test"]
    enc = tmp_path / "enc.key"
    _run("pkey", "-in", key, "-out", str(enc), "-aes256", "-passout", "pass:secret", cwd=tmp_path)
    errs = check_tls(TlsConf(cert=cert, key=str(enc)))
    assert len(errs) == 1 and ("encrypted" in errs[0] or "cannot load" in errs[0])
