"""The configuration model: frozen dataclasses with Pingora's key names and defaults.

A leaf (standard library only, no I/O). ``schema.py`` builds these from plain YAML data and
re-exports every name here, so code imports them from ``pyngora.config.schema``. Defaults live
on the dataclasses themselves; a field's ``metadata["choices"]`` lists the values the builder
accepts. :func:`parse_address` turns a listener or backend address into a
:class:`ListenerConf` (ValueError when malformed).
"""
from __future__ import annotations

import ipaddress
import os
import re
import socket
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

try:  # CPython's own SHA-1: hashlib would load OpenSSL's libcrypto (~4 MiB) into the master
    from _sha1 import sha1 as _sha1  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - another interpreter: the same digest from hashlib
    from hashlib import sha1 as _sha1

__all__ = ["Path", "SniCert", "TlsConf", "ListenerConf", "parse_address", "check_host",
           "UNIX_PATH_MAX", "HeaderEdits",
           "LimitsConf", "TimeoutsConf", "HealthCheckConf", "DiscoveryConf", "BackendConf",
           "UpstreamConf", "RouteConf", "HttpProxyConf", "StaticConf", "PrometheusConf",
           "BackgroundConf", "SERVICE_SPECS", "ServiceConf", "ServerConf"]

# A key path in the configuration (mapping keys and list indexes), as ConfigIssue reports it.
Path = tuple[Union[str, int], ...]


# --------------------------------------------------------------------------- listeners
# Field metadata the schema checks: ``above`` (exclusive) for a value that 0 would turn into
# a busy loop, a sure failure or a refusal of every request; ``range`` (inclusive, None for no
# upper bound) for a value's meaning; ``at_most`` for a cap past which the value cannot work.
_ABOVE_0 = {"above": 0}
_AT_LEAST_1 = {"range": (1, None)}


@dataclass(frozen=True)
class SniCert:
    server_name: str
    cert: str
    key: str


@dataclass(frozen=True)
class TlsConf:
    cert: str
    key: str
    alpn: tuple[str, ...] = ("h2", "http/1.1")
    sni: tuple[SniCert, ...] = ()


@dataclass(frozen=True)
class ListenerConf:
    """One listening address. ``key`` is the normalised address used in upgrade manifests."""

    address: str
    family: str = "tcp"          # "tcp" | "unix"
    host: str = ""
    port: int = 0
    path: str = ""
    mode: Optional[int] = None
    backlog: int = 1024
    tls: Optional[TlsConf] = None
    h2c: bool = False

    @property
    def key(self) -> str:
        if self.family == "unix":
            return "unix:" + self.path
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    @property
    def socket_family(self) -> int:
        if self.family == "unix":
            return socket.AF_UNIX
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET


# sun_path is 108 bytes with its NUL: a longer path fails only when the socket is bound.
UNIX_PATH_MAX = 107

# A DNS name's label (RFC 1123; "_" too, which Docker's and Consul's names have).
_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def check_host(host: str) -> None:
    """ValueError unless ``host`` is an IPv4 or IPv6 literal or a DNS name. A name whose last
    label is all digits is an IPv4 address (no top-level domain is numeric), so ``999.1.1.1``
    and inet_aton's odd spellings (``127.1``, ``127.000.000.001``) are refused as such."""
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError as e:
            raise ValueError(f"not an IPv6 address: {e}") from None
        return
    name = host[:-1] if host.endswith(".") else host  # "example.com." is fully qualified
    if not name.isascii():  # an internationalised name: getaddrinfo looks up its punycode
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError(f"{host!r} is no internationalised host name") from None
    labels = name.split(".")
    if labels[-1].isdigit():
        try:
            ipaddress.IPv4Address(host)
        except ValueError as e:
            raise ValueError(f"not an IPv4 address: {e}") from None
        return
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise ValueError(f"{host!r} is neither an IP address nor a host name")


def parse_address(addr: str, backlog: int = 1024, mode: Optional[int] = None,
                  tls: Optional[TlsConf] = None, h2c: bool = False) -> ListenerConf:
    """``HOST:PORT``, ``[V6]:PORT`` or ``unix:/path`` -> ListenerConf; ValueError when malformed.
    HOST is an IP literal, a DNS name, or empty or ``*`` (every IPv4 address)."""
    if not isinstance(addr, str) or not addr:
        raise ValueError("address must be a non-empty string")
    if addr.startswith("unix:"):
        path = addr[5:]
        if not path.startswith("/"):
            raise ValueError(f"unix socket path must be absolute: {addr!r}")
        if len(os.fsencode(path)) > UNIX_PATH_MAX:
            raise ValueError(f"unix socket path longer than {UNIX_PATH_MAX} bytes (what AF_UNIX "
                             f"takes): {addr!r}")
        return ListenerConf(address=addr, family="unix", path=path, mode=mode, backlog=backlog,
                            tls=tls, h2c=h2c)
    if addr.startswith("["):
        host, sep, port = addr[1:].partition("]:")
        if not sep or ":" not in host:
            raise ValueError(f"expected [V6]:PORT, got {addr!r}")
    else:
        host, sep, port = addr.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(f"expected HOST:PORT, got {addr!r}")
    if not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise ValueError(f"bad port in {addr!r}")
    if host in ("", "*"):
        host = "0.0.0.0"
    try:
        check_host(host)
    except ValueError as e:
        raise ValueError(f"bad host in {addr!r}: {e}") from None
    return ListenerConf(address=addr, family="tcp", host=host, port=int(port), backlog=backlog,
                        tls=tls, h2c=h2c)


# --------------------------------------------------------------------------- http_proxy
@dataclass(frozen=True)
class HeaderEdits:
    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True)
class LimitsConf:
    # sent to HTTP/2 clients as SETTINGS_MAX_HEADER_LIST_SIZE, a 32-bit value
    max_header_bytes: int = field(default=65536,
                                  metadata={"range": (1, None), "at_most": 2**32 - 1})
    max_body_bytes: Optional[int] = None
    header_read_timeout_seconds: float = 10.0
    keepalive_timeout_seconds: float = 60.0
    keepalive_requests: Optional[int] = None
    send_timeout_seconds: float = 60.0  # nginx's send_timeout: a client that reads nothing
    body_read_timeout_seconds: float = 60.0  # nginx's client_body_timeout: one that sends none
    # nginx's http2_max_concurrent_streams (SETTINGS_MAX_CONCURRENT_STREAMS): also what bounds a
    # client's stalled streams' memory (~270 KiB each, until send_timeout)
    h2_max_concurrent_streams: int = field(default=100, metadata={"range": (1, 1000)})


@dataclass(frozen=True)
class TimeoutsConf:
    # 0 would fail every connect (504), and would mean "no limit" to a read or a write, which
    # nginx's proxy_*_timeout never does: a stalled origin would hold the request forever.
    connect_seconds: float = field(default=5.0, metadata=_ABOVE_0)
    total_connect_seconds: Optional[float] = field(default=None, metadata=_ABOVE_0)
    read_seconds: float = field(default=60.0, metadata=_ABOVE_0)
    write_seconds: float = field(default=60.0, metadata=_ABOVE_0)
    idle_seconds: float = 60.0  # 0: keep no idle connection to the backends (no keep-alive)


@dataclass(frozen=True)
class HealthCheckConf:
    type: str = field(default="none", metadata={"choices": ("tcp", "http", "none")})
    path: str = "/"
    expect_status: int = field(default=200, metadata={"range": (100, 599)})
    host: Optional[str] = None
    interval_seconds: float = field(default=5.0, metadata=_ABOVE_0)
    timeout_seconds: float = field(default=2.0, metadata=_ABOVE_0)
    healthy_after: int = field(default=1, metadata=_AT_LEAST_1)
    unhealthy_after: int = field(default=1, metadata=_AT_LEAST_1)


@dataclass(frozen=True)
class DiscoveryConf:
    type: str = field(default="static", metadata={"choices": ("static", "dns")})
    name: Optional[str] = None
    port: int = field(default=80, metadata={"at_most": 65535})  # 0: none (SRV gives them)
    record: str = field(default="A", metadata={"choices": ("A", "AAAA", "SRV")})
    refresh_seconds: float = field(default=30.0, metadata=_ABOVE_0)
    resolver: Optional[str] = None


@dataclass(frozen=True)
class BackendConf:
    addr: str
    # as SRV weights; round robin's ring and the hash arrays are capped anyway (lb.selection)
    weight: int = field(default=1, metadata={"range": (1, None), "at_most": 65535})
    tls: bool = False
    sni: Optional[str] = None
    verify: bool = True


@dataclass(frozen=True)
class UpstreamConf:
    name: str = ""
    backends: tuple[BackendConf, ...] = ()
    selection: str = field(default="round_robin",
                           metadata={"choices": ("round_robin", "random", "fnv", "consistent")})
    hash_key: str = "uri"
    discovery: DiscoveryConf = DiscoveryConf()
    health_check: HealthCheckConf = HealthCheckConf()
    timeouts: TimeoutsConf = TimeoutsConf()
    retries: Optional[int] = None
    h2: bool = False


@dataclass(frozen=True)
class RouteConf:
    upstream: str
    host: Optional[str] = None
    path_prefix: Optional[str] = None


@dataclass(frozen=True)
class HttpProxyConf:
    upstreams: tuple[UpstreamConf, ...] = ()
    routes: tuple[RouteConf, ...] = ()
    upstream: Optional[str] = None
    app: Optional[str] = None
    request_headers: HeaderEdits = HeaderEdits()
    response_headers: HeaderEdits = HeaderEdits()
    limits: LimitsConf = LimitsConf()
    forwarded_headers: bool = False
    extra: dict = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class StaticConf:
    status: int = field(default=200, metadata={"range": (200, 599)})  # a final response
    headers: tuple[tuple[str, str], ...] = ()
    body: str = ""
    limits: LimitsConf = LimitsConf()


@dataclass(frozen=True)
class PrometheusConf:
    path: str = "/metrics"


@dataclass(frozen=True)
class BackgroundConf:
    app: str = ""


SERVICE_SPECS: dict[str, type] = {
    "http_proxy": HttpProxyConf,
    "static": StaticConf,
    "prometheus": PrometheusConf,
    "background": BackgroundConf,
}


@dataclass(frozen=True)
class ServiceConf:
    name: str
    type: str
    listeners: tuple[ListenerConf, ...] = ()
    threads: Optional[int] = None
    work_stealing: Optional[bool] = None
    spec: Any = None


def _default_runtime_dir() -> str:
    base = os.environ.get("RUNTIME_DIRECTORY") or os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    return os.path.join(base.split(":")[0], "pyngora")


@dataclass(frozen=True)
class ServerConf:
    """Pingora's ServerConf keys, plus pyngora's own (SPEC section 5)."""

    version: int = 1
    daemon: bool = False
    error_log: Optional[str] = None
    pid_file: str = "/tmp/pyngora.pid"
    upgrade_sock: str = "/tmp/pyngora_upgrade.sock"
    user: Optional[str] = None
    group: Optional[str] = None
    working_directory: Optional[str] = None
    threads: int = 1
    work_stealing: bool = True
    ca_file: Optional[str] = None
    grace_period_seconds: float = 300.0
    graceful_shutdown_timeout_seconds: float = 5.0
    upstream_keepalive_pool_size: int = 128
    max_retries: int = 16
    upgrade_timeout_seconds: float = field(default=30.0, metadata=_ABOVE_0)
    access_log: str = "off"
    access_log_format: str = field(default="combined", metadata={"choices": ("combined", "json")})
    log_level: str = field(default="info", metadata={
        "choices": ("debug", "info", "warning", "error", "critical")})
    metrics_dir: Optional[str] = None
    services: tuple[ServiceConf, ...] = ()
    source: str = field(default="", compare=False)
    # the loader's key -> line lookup, so checks made after parsing (certificates, apps) can
    # still name file, line and key
    where: Optional[Callable[[Path], Optional[int]]] = field(default=None, compare=False,
                                                              repr=False)

    def line_of(self, path: Path) -> Optional[int]:
        return self.where(path) if self.where is not None else None

    @property
    def metrics_path(self) -> str:
        """``metrics_dir``, else one directory per ``pid_file`` under the runtime directory, so
        two servers on one host never mix their counts."""
        if self.metrics_dir:
            return self.metrics_dir
        tag = _sha1(os.path.abspath(self.pid_file).encode()).hexdigest()[:12]
        return os.path.join(_default_runtime_dir(), "metrics-" + tag)

    def health_table_path(self, service: str) -> str:
        """The shared health table of one proxy service (written by its prober process)."""
        tag = _sha1(os.path.abspath(self.pid_file).encode()).hexdigest()[:12]
        return os.path.join(_default_runtime_dir(), f"health-{tag}-{service}.tbl")

    def service_threads(self, svc_threads: Optional[int]) -> int:
        return svc_threads if svc_threads is not None else self.threads
