"""HttpPeer and PeerOptions: where to send a request and how (Pingora's ``upstreams::peer``).

A peer is built per request by ``ProxyHttp.upstream_peer`` (cheap: a few attribute stores) and
handed to the Connector, which reuses a pooled connection whose *reuse key* is equal. Two peers
share connections only if everything that makes a connection different is the same: address,
TLS or not, SNI, certificate and hostname verification, the CA file and the ALPN list (the same
rules as Pingora's pooling.md: anything else would hand one tenant's TLS session to another).
"""
from __future__ import annotations

from typing import Hashable, Optional


class PeerOptions:
    """Timeouts (seconds; None = none) and TLS settings of one peer.

    ``connection_timeout`` bounds the TCP connect (and the TLS handshake, when there is no
    ``total_connection_timeout``), ``total_connection_timeout`` TCP + TLS;
    ``read_timeout`` the wait for each piece of the response, ``write_timeout`` a blocked
    write; ``idle_timeout`` how long a connection may wait in the pool (0 = never pool it).
    """

    __slots__ = ("connection_timeout", "total_connection_timeout", "read_timeout",
                 "write_timeout", "idle_timeout", "verify_cert", "verify_hostname", "ca_file",
                 "alpn")

    def __init__(self, connection_timeout: Optional[float] = 5.0,
                 total_connection_timeout: Optional[float] = None,
                 read_timeout: Optional[float] = 60.0, write_timeout: Optional[float] = 60.0,
                 idle_timeout: Optional[float] = 60.0, verify_cert: bool = True,
                 verify_hostname: bool = True, ca_file: Optional[str] = None,
                 alpn: tuple[str, ...] = ("http/1.1",)) -> None:
        self.connection_timeout = connection_timeout
        self.total_connection_timeout = total_connection_timeout
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        self.idle_timeout = idle_timeout
        self.verify_cert = verify_cert
        self.verify_hostname = verify_hostname
        self.ca_file = ca_file
        self.alpn = tuple(alpn)

    def copy(self) -> "PeerOptions":
        """A fresh copy (peers built from one template can then be tuned one by one)."""
        return PeerOptions(self.connection_timeout, self.total_connection_timeout,
                           self.read_timeout, self.write_timeout, self.idle_timeout,
                           self.verify_cert, self.verify_hostname, self.ca_file, self.alpn)

    def tls_key(self) -> tuple[Hashable, ...]:
        """What of these options changes a TLS connection (part of the reuse key)."""
        return (self.verify_cert, self.verify_hostname, self.ca_file, self.alpn)

    def __repr__(self) -> str:
        return "PeerOptions(" + ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__) + ")"


_DEFAULT_OPTIONS = PeerOptions()


def split_address(address: str) -> tuple[str, int, Optional[str]]:
    """Parse ``host:port``, ``[v6]:port`` or ``unix:/path`` into (host, port, unix_path).

    Called once per peer. Raises ValueError on a malformed address.
    """
    if address.startswith("unix:"):
        path = address[5:]
        if not path:
            raise ValueError(f"empty unix socket path in {address!r}")
        return "", 0, path
    if address.startswith("["):
        end = address.find("]")
        if end < 0 or address[end + 1:end + 2] != ":":
            raise ValueError(f"bad IPv6 address {address!r} (expected [ADDR]:PORT)")
        host, port_s = address[1:end], address[end + 2:]
    else:
        host, sep, port_s = address.rpartition(":")
        if not sep or not host:
            raise ValueError(f"bad address {address!r} (expected HOST:PORT)")
        if ":" in host:
            raise ValueError(f"bad address {address!r} (write IPv6 as [ADDR]:PORT)")
    try:
        port = int(port_s)
    except ValueError:
        raise ValueError(f"bad port in {address!r}") from None
    if not 0 < port < 65536:
        raise ValueError(f"port out of range in {address!r}")
    return host, port, None


class HttpPeer:
    """One upstream to send a request to (Pingora's ``HttpPeer``).

    ``address`` is ``"host:port"``, ``"[v6]:port"`` or ``"unix:/path"``; ``tls`` speaks HTTPS;
    ``sni`` is the TLS server name (default: the host). ``upstream`` is the group name the
    metrics are labelled with; ``backend`` the address as written (the metrics' backend label).
    """

    __slots__ = ("address", "host", "port", "unix_path", "tls", "sni", "options", "upstream",
                 "backend")

    def __init__(self, address: str, tls: bool = False, sni: str = "",
                 options: Optional[PeerOptions] = None, upstream: str = "") -> None:
        self.address = address
        self.host, self.port, self.unix_path = split_address(address)
        self.tls = tls
        self.sni = sni
        # Each peer owns its options, so tuning one peer never changes another.
        self.options = options if options is not None else _DEFAULT_OPTIONS.copy()
        self.upstream = upstream
        self.backend = address

    @property
    def server_name(self) -> str:
        """The TLS server name to send and verify: ``sni``, else the host."""
        return self.sni or self.host

    @property
    def reuse_key(self) -> Hashable:
        """Connections are shared only between peers with equal keys (see the module doc)."""
        if not self.tls:
            return (self.address, False)
        return (self.address, True, self.server_name) + self.options.tls_key()

    def __repr__(self) -> str:
        tls = f", tls=True, sni={self.sni!r}" if self.tls else ""
        return f"HttpPeer({self.address!r}{tls}, upstream={self.upstream!r})"


__all__ = ["HttpPeer", "PeerOptions", "split_address"]
