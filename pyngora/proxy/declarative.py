"""The YAML ``http_proxy`` service (SPEC section 5) as a ProxyHttp subclass.

Everything is compiled once, when the service is built: routes become a tuple of
(host, path prefix, group) tried in order (first match wins), header edits become tuples of
bytes, and the subclass is assembled with only the phases the configuration needs (no header
edits, no forwarded headers -> no ``upstream_request_filter`` at all), so the engine skips the
rest.

Backend selection: proxy must not import ``pyngora.lb`` (DESIGN's one-way doors), so whoever
builds the service may hand in ``balancer_factory(upstream_conf) -> balancer``; it is called
once per upstream group in each worker, and the balancer must offer ``select(key: bytes) ->
Backend | None`` (``Backend.addr``) and may offer ``report_failure(backend)``. Without a
factory, each group picks its static backends round robin (weights honoured by repetition).

``app: "module:Class"`` loads a user's ProxyHttp subclass instead, constructed with the
HttpProxyConf as its context (``Class(conf)``, or ``Class()`` if it takes no argument).
"""
from __future__ import annotations

import importlib
import inspect
import itertools
import math
from typing import Any, Callable, Optional

from pyngora.config.schema import (BackendConf, HeaderEdits, HttpProxyConf, ServerConf,
                                   ServiceConf, UpstreamConf)
from pyngora.errors import Error, ErrorSource, ErrorType
from pyngora.headers import Headers, RequestHeader, ResponseHeader
from pyngora.proxy import ProxyService
from pyngora.proxy.phases import ProxyHttp
from pyngora.proxy.route_path import route_path
from pyngora.proxy.session import Session
from pyngora.services.base import WorkerContext
from pyngora.upstreams.peer import HttpPeer, PeerOptions

__all__ = ["DeclarativeProxy", "build_proxy", "build_proxy_service", "load_app"]

BalancerFactory = Callable[[UpstreamConf], Any]


def _b(s: str) -> bytes:
    return s.encode("latin-1")


class _Edits:
    """Pre-encoded header edits: remove, then set, then add (as nginx's and Pingora's users
    expect: a field both removed and set ends up set)."""

    __slots__ = ("remove", "set", "add")

    def __init__(self, edits: HeaderEdits) -> None:
        self.remove = tuple(_b(n) for n in edits.remove)
        self.set = tuple((_b(n), _b(v)) for n, v in edits.set)
        self.add = tuple((_b(n), _b(v)) for n, v in edits.add)

    def __bool__(self) -> bool:
        return bool(self.remove or self.set or self.add)

    def apply(self, headers: Headers) -> None:
        for name in self.remove:
            headers.remove(name)
        for name, value in self.set:
            headers.set(name, value)
        for name, value in self.add:
            headers.add(name, value)


def _key_fn(hash_key: str) -> Callable[[Session], bytes]:
    """The selection key of a request for ``hash_key`` (uri | path | client_ip | header:NAME |
    cookie:NAME), compiled once."""
    if hash_key == "path":
        return lambda s: s.req_header.path.encode("latin-1")
    if hash_key == "client_ip":
        return lambda s: s.client_ip.encode("latin-1")
    if hash_key.startswith("header:"):
        name = _b(hash_key[7:].strip().lower())
        return lambda s: s.req_header.headers.get(name) or b""
    if hash_key.startswith("cookie:"):
        want = _b(hash_key[7:].strip())

        def cookie(s: Session) -> bytes:
            for value in s.req_header.headers.get_all(b"cookie"):
                for part in value.split(b";"):
                    name, _, v = part.strip().partition(b"=")
                    if name == want:
                        return v
            return b""
        return cookie
    return lambda s: s.req_header.uri.encode("latin-1")


# Round robin's ring holds about this many entries at most (each backend at least once),
# whatever the weights, as lb.selection's weighted array: it is built in every worker.
_RING_CAP = 8192


def _ring(backends: tuple[BackendConf, ...]) -> list[str]:
    """Each backend's address ``weight`` times: weights divided by their gcd, and scaled
    down (each kept at least once) when their total passes _RING_CAP."""
    weights = [max(b.weight, 1) for b in backends]
    g = math.gcd(*weights) if weights else 1
    weights = [w // g for w in weights]
    total = sum(weights)
    if total > _RING_CAP:
        weights = [max(1, round(w * _RING_CAP / total)) for w in weights]
    return [b.addr for b, w in zip(backends, weights) for _ in range(w)]


class _Group:
    """One upstream group: its backends, peer options and selection, per worker."""

    __slots__ = ("name", "conf", "backends", "options", "retries", "key", "balancer",
                 "_rr", "_ring_len", "_hashed", "peers")

    def __init__(self, conf: UpstreamConf) -> None:
        self.name = conf.name
        self.conf = conf
        self.backends: dict[str, BackendConf] = {b.addr: b for b in conf.backends}
        t = conf.timeouts
        self.options = PeerOptions(connection_timeout=t.connect_seconds,
                                   total_connection_timeout=t.total_connect_seconds,
                                   read_timeout=t.read_seconds, write_timeout=t.write_seconds,
                                   idle_timeout=t.idle_seconds)
        if conf.h2:
            # HTTP/2 to these backends: ALPN h2 over TLS, prior knowledge in plaintext.
            self.options.alpn = ("h2",)
        # Retries default to one per backend (at least one, for a dead pooled connection),
        # so a group of one unreachable backend fails in one connect timeout, not sixteen. A
        # DNS group's backends are what it discovered at the time: None, counted per request.
        dns = getattr(conf.discovery, "type", "static") == "dns"
        self.retries: Optional[int] = conf.retries if conf.retries is not None else (
            None if dns else max(len(conf.backends), 1))
        self.key = _key_fn(conf.hash_key)
        self._hashed = conf.selection in ("fnv", "consistent")
        self.balancer: Any = None
        ring = _ring(conf.backends)
        self._rr = itertools.cycle(ring) if ring else None
        self._ring_len = len(ring)
        # Prebuilt peers of the configured backends, for DeclarativeProxy's own classes only
        # (nothing there mutates a peer; a user's subclass may, so it gets a fresh one).
        self.peers: dict[str, HttpPeer] = {}

    def discovered_retries(self) -> int:
        """A DNS group's default retries: one per backend it knows of now (at least one)."""
        backends = getattr(self.balancer, "backends", None)
        return max(len(backends()) if callable(backends) else 0, 1)

    def next_addr(self) -> Optional[str]:
        """``pick`` for a group that hashes nothing (the express lane has no Session)."""
        bal = self.balancer
        if bal is not None:
            backend = bal.select(b"")
            return None if backend is None else backend.addr
        return next(self._rr) if self._rr is not None else None

    def pick(self, session: Session) -> Optional[str]:
        """The address of the backend for this request (None: none available).

        On a retry (``session.tried`` holds the backends of the failed attempts) the next
        usable backend not tried yet, as nginx's proxy_next_upstream: a hash would give the
        one that just failed again, and so may round robin (a weighted ring repeats a
        backend) or random. Once every backend was tried, the balancer's own choice (a
        pooled connection that died is worth a fresh one to the same backend). A balancer
        of the hook without select_with keeps its own choice."""
        bal = self.balancer
        tried = session.tried
        if not tried:
            if bal is None or not self._hashed:
                return self.next_addr()
            backend = bal.select(self.key(session))
            return None if backend is None else backend.addr
        if bal is None:
            return self._next_untried(tried)
        key = self.key(session) if self._hashed else b""
        backend = None
        select_with = getattr(bal, "select_with", None)
        if select_with is not None:
            backend = select_with(key, 256, lambda b, ok: ok and b.addr not in tried)
        if backend is None:
            backend = bal.select(key)
        return None if backend is None else backend.addr

    def _next_untried(self, tried: set[str]) -> Optional[str]:
        """The ring's next address not in ``tried`` (a group without a balancer), else its
        next one."""
        if self._rr is None:
            return None
        for _ in range(self._ring_len):
            addr = next(self._rr)
            if addr not in tried:
                return addr
        return next(self._rr)

    def plain(self) -> bool:
        """True when a pick needs no Session (no hash key, no retry memory) and the backends
        speak HTTP/1: what the express lane serves."""
        alpn = self.options.alpn
        return not self._hashed and not (alpn and alpn[0] == "h2")

    def shared_peer(self, addr: str) -> HttpPeer:
        """The prebuilt peer of ``addr`` (DeclarativeProxy's own classes only: see peers)."""
        peer = self.peers.get(addr)
        if peer is None:
            peer = self.peer(addr)
            if addr in self.backends:  # discovered addresses come and go: not kept
                self.peers[addr] = peer
        return peer

    def no_backend(self) -> Error:
        """What a request gets when the pick found no usable backend (503)."""
        return Error(ErrorType.NoUpstream, ErrorSource.Upstream, None,
                     f"no healthy backend in upstream {self.name!r}")

    def max_retries(self) -> int:
        """``Session.max_retries`` for a request to this group."""
        retries = self.retries
        return retries if retries is not None else self.discovered_retries()

    def peer(self, addr: str) -> HttpPeer:
        b = self.backends.get(addr)
        opts = self.options.copy()
        sni = b.sni if b is not None else None
        if b is None:
            # Discovered (DNS): the group's first backend, when it has one, says how to talk
            # to all of them (tls, sni -- default: the DNS name --, verify), as the health
            # check reads it (lb/balancer.py discovery_from_conf).
            if not self.conf.backends:
                return HttpPeer(addr, False, "", opts, self.name)
            b = self.conf.backends[0]
            sni = b.sni or getattr(self.conf.discovery, "name", None)
        if not b.verify:
            opts.verify_cert = False
            opts.verify_hostname = False
        return HttpPeer(addr, b.tls, sni or "", opts, self.name)


class DeclarativeProxy(ProxyHttp):
    """``type: http_proxy`` from YAML. Build it with :func:`build_proxy` (which adds only the
    header phases the configuration needs)."""

    def __init__(self, conf: HttpProxyConf, balancer_factory: Optional[BalancerFactory] = None
                 ) -> None:
        self.conf = conf
        self.balancer_factory = balancer_factory
        self.groups: dict[str, _Group] = {u.name: _Group(u) for u in conf.upstreams}
        routes = []
        for r in conf.routes:
            host = r.host.lower() if r.host else None
            routes.append((host, r.path_prefix or None, self.groups[r.upstream]))
        self.routes: tuple[tuple[Optional[str], Optional[str], _Group], ...] = tuple(routes)
        self.default: Optional[_Group] = self.groups.get(conf.upstream) if conf.upstream else None
        if self.default is None and not routes and len(self.groups) == 1:
            self.default = next(iter(self.groups.values()))
        self.req_edits = _Edits(conf.request_headers)
        self.resp_edits = _Edits(conf.response_headers)
        self.forwarded = conf.forwarded_headers
        # True only for the classes build_proxy assembles (see _Group.peers).
        self._shared_peers = type(self) in _CLASSES.values()

    async def worker_started(self, ctx: WorkerContext) -> None:
        """In each worker: build the balancers (when a factory was given)."""
        if self.balancer_factory is not None:
            for g in self.groups.values():
                g.balancer = self.balancer_factory(g.conf)

    def route(self, session: Session) -> Optional[_Group]:
        """The group of the first matching route (host and/or path prefix), else the default."""
        if self.routes:
            return self.route_to(*session.host_and_path())
        return self.default

    def route_to(self, host_b: bytes, target: str) -> Optional[_Group]:
        """``route`` for a Host value and request-target (the express lane has no Session)."""
        if self.routes:
            path = route_path(target)  # "//admin", "/%61dmin", "/x/../admin": "/admin"
            host = host_b.decode("latin-1").lower()
            if host.startswith("["):
                host = host[:host.find("]") + 1]
            else:
                host = host.partition(":")[0]
                if host.endswith("."):
                    host = host[:-1]  # "example.com." is "example.com" (DNS's root label)
            for rhost, prefix, group in self.routes:
                if rhost is not None and not (
                        rhost == host or (rhost[:2] == "*." and host.endswith(rhost[1:]))):
                    continue
                if prefix is not None and not path.startswith(prefix):
                    continue
                return group
        return self.default

    async def upstream_peer(self, session: Session, ctx: Any) -> HttpPeer:
        """The peer for this request: the route's group, its balancer's pick (raises Error
        404 when no route matches, NoUpstream when no backend is healthy)."""
        return self._peer(session)

    def _peer(self, session: Session) -> HttpPeer:
        group = self.route(session)
        if group is None:
            raise Error(ErrorType.HTTPStatus, ErrorSource.Downstream, None,
                        "no route matches", status=404)
        session.max_retries = group.max_retries()
        failed = session.peer
        if failed is not None:  # a retry: the attempt before went to this one
            tried = session.tried
            if tried is None:
                tried = session.tried = set()
            tried.add(failed.address)
        addr = group.pick(session)
        if addr is None:
            raise group.no_backend()
        if self._shared_peers:
            return group.shared_peer(addr)
        return group.peer(addr)

    async def fail_to_connect(self, session: Session, peer: HttpPeer, ctx: Any,
                              e: Error) -> Error:
        group = self.groups.get(peer.upstream)
        bal = group.balancer if group is not None else None
        listed = callable(getattr(bal, "backends", None))
        report = getattr(bal, "report_failure", None)
        if report is not None:
            for b in bal.backends() if listed else ():
                if b.addr == peer.address:
                    report(b)
                    break
        if group is not None and e.retry:
            # A failed connect is the backend's, not a connection's: once every backend of
            # the group failed this request, another try at one of them only doubles the
            # client's wait (nginx tries each server once). The spare retry stays for a dead
            # pooled connection, which is not this case.
            addrs = {b.addr for b in bal.backends()} if listed else set(group.backends)
            if addrs and addrs <= {peer.address, *(session.tried or ())}:
                e.set_retry(False)
        return e


async def _request_edits(self: DeclarativeProxy, session: Session, up: RequestHeader,
                         ctx: Any) -> None:
    if self.forwarded:
        h = up.headers
        # "unix:" for a Unix-socket client, as nginx's $remote_addr: appending nothing would
        # make the client's own (perhaps forged) last entry look like ours.
        ip = (session.client_ip or "unix:").encode()
        # Every X-Forwarded-For line, joined (RFC 9110 5.3: one list): keeping only the first
        # would drop the address a trusted proxy in front appended on a line of its own.
        prior = b", ".join(h.get_all(b"x-forwarded-for"))
        h.set(b"X-Forwarded-For", prior + b", " + ip if prior else ip)
        h.set(b"X-Forwarded-Proto", session.scheme.encode())
        host = session.req_header.headers.get(b"host")
        if host is not None:
            h.set(b"X-Forwarded-Host", host)
    if self.req_edits:
        self.req_edits.apply(up.headers)


def _upstream_peer(self: DeclarativeProxy, session: Session, ctx: Any) -> HttpPeer:
    """upstream_peer of the classes build_proxy assembles (synchronous: see there)."""
    return self._peer(session)


async def _response_edits(self: DeclarativeProxy, session: Session, resp: ResponseHeader,
                          ctx: Any) -> None:
    self.resp_edits.apply(resp.headers)


_CLASSES: dict[tuple[bool, bool], type] = {}


def build_proxy(conf: HttpProxyConf, balancer_factory: Optional[BalancerFactory] = None,
                load_object: Optional[Callable[[str], Any]] = None) -> ProxyHttp:
    """The ProxyHttp for ``conf``: the user's ``app`` if set, else a DeclarativeProxy whose
    class has only the header phases this configuration uses."""
    if conf.app:
        return load_app(conf.app, conf, load_object)
    need_req = bool(conf.forwarded_headers or conf.request_headers.remove
                    or conf.request_headers.set or conf.request_headers.add)
    need_resp = bool(conf.response_headers.remove or conf.response_headers.set
                     or conf.response_headers.add)
    cls = _CLASSES.get((need_req, need_resp))
    if cls is None:
        # A plain function as upstream_peer: the engine calls it without a coroutine and an
        # await per request. (DeclarativeProxy's own stays async for subclasses that await it.)
        attrs: dict[str, Any] = {"upstream_peer": _upstream_peer}
        if need_req:
            attrs["upstream_request_filter"] = _request_edits
        if need_resp:
            attrs["response_filter"] = _response_edits
        cls = type("DeclarativeProxy", (DeclarativeProxy,), attrs)
        _CLASSES[(need_req, need_resp)] = cls
    return cls(conf, balancer_factory)


def load_app(spec: str, conf: Any = None,
             load_object: Optional[Callable[[str], Any]] = None) -> ProxyHttp:
    """Import ``"module:Class"`` and build it with ``conf`` as its context. Raises ImportError,
    AttributeError or TypeError with a clear message (``pyngora -t`` reports them)."""
    if load_object is not None:
        obj: Any = load_object(spec)
    else:
        module_name, sep, attr = spec.partition(":")
        if not sep or not module_name or not attr:
            raise ImportError(f"app must be 'module:Class', got {spec!r}")
        obj = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    if inspect.isclass(obj):
        if not issubclass(obj, ProxyHttp):
            raise TypeError(f"{spec} is not a ProxyHttp subclass")
        try:
            params = inspect.signature(obj).parameters
        except (TypeError, ValueError):
            params = {}  # type: ignore[assignment]
        obj = obj(conf) if params else obj()
    if not isinstance(obj, ProxyHttp):
        raise TypeError(f"{spec} did not give a ProxyHttp (got {type(obj).__name__})")
    return obj


def build_proxy_service(*args: Any, balancer_factory: Optional[BalancerFactory] = None,
                        load_object: Optional[Callable[[str], Any]] = None) -> ProxyService:
    """The service for a YAML ``type: http_proxy`` entry (listeners, threads from the
    ServiceConf; limits from its spec). Called as ``build_proxy_service(service_conf)`` or,
    by the CLI, ``build_proxy_service(server_conf, service_conf[, load_object])``.

    ``balancer_factory(upstream_conf)``: see the module doc (None = built-in round robin).
    ``load_object("module:Class")``: how ``app`` is imported (default: importlib)."""
    rest = list(args)
    if rest and isinstance(rest[0], ServerConf):
        rest.pop(0)
    if not rest or not isinstance(rest[0], ServiceConf):
        raise TypeError("build_proxy_service needs a ServiceConf")
    service_conf = rest.pop(0)
    if rest and load_object is None and callable(rest[0]):
        load_object = rest.pop(0)
    spec = service_conf.spec
    if not isinstance(spec, HttpProxyConf):
        raise TypeError(f"service {service_conf.name!r} is not an http_proxy")
    return ProxyService(service_conf.name, build_proxy(spec, balancer_factory, load_object),
                        service_conf, spec.limits)
