"""The YAML ``http_proxy`` service (proxy/declarative.py), in-process over loopback: routes,
header edits, forwarded headers, round robin, the balancer hook, timeouts, retries, and
``app: "module:Class"``."""
from __future__ import annotations

import asyncio
from typing import Any, Optional

import pytest

from pyngora.config.loader import parse_text
from pyngora.config.schema import HttpProxyConf, ServerConf, ServiceConf
from pyngora.headers import Headers
from pyngora.proxy import ProxyHttp, Session
from pyngora.proxy.declarative import build_proxy_service
from pyngora.services.http_app import Exchange, HttpApp
from pyngora.upstreams.peer import HttpPeer

from tests.protocol.test_http_app import static
from tests.protocol.test_http_app_helpers import AppService, Client, run, serving


class HeaderEcho(HttpApp):
    """Origin that answers with the request head it received, one field per line."""

    def __init__(self, tag: str = "") -> None:
        self.tag = tag

    def handle(self, ex: Exchange) -> None:
        lines = [ex.head.method + b" " + ex.head.target]
        lines += [n + b": " + v for n, v in ex.head.headers]
        ex.respond(200, Headers([("X-Tag", self.tag), ("X-Remove-Me", "x")]),
                   b"\n".join(lines))
        return None


def proxy_conf(yaml_services: str) -> tuple[ServerConf, ServiceConf]:
    conf = parse_text("version: 1\nservices:\n" + yaml_services, "<test>")
    return conf, conf.services[0]


def heads(body: bytes) -> dict[str, str]:
    out = {}
    for line in body.decode().split("\n")[1:]:
        n, _, v = line.partition(": ")
        out[n.lower()] = v
    return out


def test_routes_header_edits_and_forwarded_headers() -> None:
    async def main() -> None:
        async with serving(AppService(HeaderEcho("a"))) as (pa, _), \
                serving(AppService(HeaderEcho("b"))) as (pb, _):
            conf, sc = proxy_conf(f"""
  - name: gw
    type: http_proxy
    listeners: ["127.0.0.1:0"]
    upstreams:
      - {{name: a, backends: [{{addr: "127.0.0.1:{pa}"}}]}}
      - {{name: b, backends: [{{addr: "127.0.0.1:{pb}"}}]}}
    routes:
      - {{host: api.example.com, path_prefix: /v2, upstream: b}}
      - {{path_prefix: /static, upstream: b}}
      - {{host: "*.b.test", upstream: b}}
    upstream: a
    forwarded_headers: true
    request_headers: {{set: {{x-env: test}}, add: {{x-added: "1"}}, remove: [x-secret]}}
    response_headers: {{set: {{x-proxy: pyngora}}, remove: [x-remove-me]}}
""")
            async with serving(build_proxy_service(conf, sc), conf) as (pport, _):
                c = await Client.connect(pport)
                cases = [("api.example.com", "/v2/x", "b"), ("api.example.com:8080", "/v2", "b"),
                         ("api.example.com", "/v1", "a"), ("other", "/static/app.js", "b"),
                         ("x.b.test", "/", "b"), ("b.test.evil", "/", "a")]
                for host, path, tag in cases:
                    await c.send(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nX-Secret: s\r\n"
                                 f"X-Forwarded-For: 10.0.0.1\r\n\r\n".encode())
                    r = await c.read_response()
                    assert r.header("x-tag") == tag, (host, path)
                    assert r.header("x-proxy") == "pyngora" and r.header("x-remove-me") is None
                    h = heads(r.body)
                    assert h["x-env"] == "test" and h["x-added"] == "1" and "x-secret" not in h
                    assert h["x-forwarded-for"] == "10.0.0.1, 127.0.0.1"
                    assert h["x-forwarded-proto"] == "http" and h["x-forwarded-host"] == host
                    assert h["host"] == host  # the Host header goes up as the client sent it
                c.close()
    run(main())


def test_round_robin_and_retry_to_next_backend() -> None:
    async def main() -> None:
        dead = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        dport = dead.sockets[0].getsockname()[1]
        dead.close()
        await dead.wait_closed()
        async with serving(AppService(HeaderEcho("a"))) as (pa, _), \
                serving(AppService(HeaderEcho("b"))) as (pb, _):
            conf, sc = proxy_conf(f"""
  - name: lb
    type: http_proxy
    listeners: ["127.0.0.1:0"]
    upstreams:
      - name: pool
        backends: [{{addr: "127.0.0.1:{pa}"}}, {{addr: "127.0.0.1:{pb}"}}, {{addr: "127.0.0.1:{dport}"}}]
""")
            async with serving(build_proxy_service(conf, sc), conf) as (pport, _):
                c = await Client.connect(pport)
                tags = [(await c.request()).header("x-tag") for _ in range(6)]
                # The dead backend's turn is retried on the next one: never an error.
                assert sorted(set(tags)) == ["a", "b"] and len(tags) == 6
                c.close()
    run(main())


class FixedBalancer:
    """What a pyngora.lb.LoadBalancer offers the declarative proxy: select + report_failure."""

    class B:
        def __init__(self, addr: str) -> None:
            self.addr = addr

    def __init__(self, addrs: list[str]) -> None:
        self._b = [self.B(a) for a in addrs]
        self.keys: list[bytes] = []
        self.failed: list[str] = []

    def select(self, key: bytes) -> Optional["FixedBalancer.B"]:
        self.keys.append(key)
        alive = [b for b in self._b if b.addr not in self.failed]
        return alive[0] if alive else None

    def backends(self) -> tuple["FixedBalancer.B", ...]:
        return tuple(self._b)

    def report_failure(self, b: "FixedBalancer.B") -> None:
        self.failed.append(b.addr)


def test_balancer_hook_hash_key_and_no_backend_503() -> None:
    async def main() -> None:
        dead = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        dport = dead.sockets[0].getsockname()[1]
        dead.close()
        await dead.wait_closed()
        async with serving(AppService(HeaderEcho("a"))) as (pa, _):
            conf, sc = proxy_conf(f"""
  - name: lb
    type: http_proxy
    listeners: ["127.0.0.1:0"]
    upstreams:
      - name: pool
        selection: consistent
        hash_key: "header:x-user"
        backends: [{{addr: "127.0.0.1:{dport}"}}, {{addr: "127.0.0.1:{pa}"}}]
      - name: gone
        backends: [{{addr: "127.0.0.1:{dport}"}}]
    routes:
      - {{path_prefix: /none, upstream: gone}}
      - {{path_prefix: /, upstream: pool}}
""")
            made: dict[str, FixedBalancer] = {}

            def factory(uconf: Any) -> FixedBalancer:
                made[uconf.name] = FixedBalancer([b.addr for b in uconf.backends])
                return made[uconf.name]

            svc = build_proxy_service(conf, sc, balancer_factory=factory)
            async with serving(svc, conf) as (pport, _):
                c = await Client.connect(pport)
                r = await c.request("GET", "/", headers=(("X-User", "alice"),))
                assert r.status == 200 and r.header("x-tag") == "a"
                assert made["pool"].keys[:2] == [b"alice", b"alice"]
                assert made["pool"].failed == [f"127.0.0.1:{dport}"]
                # Its only backend fails (502: no other to try) and is reported; the balancer
                # then has none: the next request gets 503.
                r = await c.request("GET", "/none")
                assert r.status == 502 and made["gone"].failed == [f"127.0.0.1:{dport}"]
                c.close()
                c = await Client.connect(pport)
                r = await c.request("GET", "/none")
                assert r.status == 503 and made["gone"].failed == [f"127.0.0.1:{dport}"]
    run(main())


Req = tuple[str, tuple[tuple[str, str], ...]]  # (request-target, header fields) of one GET


@pytest.mark.parametrize("hash_key,requests,keys", [
    # uri: the request-target as sent, path and query
    ("uri", [("/a/b?x=1&y=2", ()), ("/", ())], [b"/a/b?x=1&y=2", b"/"]),
    # path: the same targets without their query
    ("path", [("/a/b?x=1&y=2", ()), ("/c?", ()), ("/", ())], [b"/a/b", b"/c", b"/"]),
    # client_ip: the peer address of the client's connection (Client dials 127.0.0.1)
    ("client_ip", [("/", ()), ("/x?q", ())], [b"127.0.0.1", b"127.0.0.1"]),
    # header:NAME, case-insensitively; b"" when the request has none
    ("header:X-User", [("/", (("x-USER", "bob"),)), ("/", ()), ("/", (("X-Other", "z"),))],
     [b"bob", b"", b""]),
    # cookie:NAME: the named cookie's value wherever it sits, over one or several Cookie
    # fields; names that merely contain NAME do not count; b"" when it is absent
    ("cookie:sid", [
        ("/", (("Cookie", "a=1; sid=abc; b=2"),)),
        ("/", (("Cookie", "a=1"), ("Cookie", "b=2;sid=xyz"))),
        ("/", (("Cookie", "sid=v=1"),)),
        ("/", (("Cookie", "xsid=1; sidx=2; SID=3"),)),
        ("/", (("Cookie", "a=1"), ("Cookie", "b=2"))),
        ("/?sid=q", ()),
    ], [b"abc", b"xyz", b"v=1", b"", b"", b""]),
], ids=["uri", "path", "client_ip", "header", "cookie"])
def test_each_hash_key_hands_the_balancer_its_key(hash_key: str, requests: list[Req],
                                                  keys: list[bytes]) -> None:
    """What ``_key_fn`` extracts for each ``hash_key`` kind is the key the group's balancer
    gets, request by request, through the real proxy over loopback (the hook's FixedBalancer
    records it): ``uri``, ``path``, ``client_ip``, ``header:NAME`` and ``cookie:NAME``,
    present and absent."""
    async def main() -> None:
        async with serving(AppService(HeaderEcho("a"))) as (pa, _):
            conf, sc = proxy_conf(f"""
  - name: lb
    type: http_proxy
    listeners: ["127.0.0.1:0"]
    upstreams:
      - name: pool
        selection: consistent
        hash_key: "{hash_key}"
        backends: [{{addr: "127.0.0.1:{pa}"}}]
""")
            made: list[FixedBalancer] = []

            def factory(uconf: Any) -> FixedBalancer:
                made.append(FixedBalancer([b.addr for b in uconf.backends]))
                return made[-1]

            async with serving(build_proxy_service(conf, sc, balancer_factory=factory),
                               conf) as (pport, _):
                c = await Client.connect(pport)
                for target, headers in requests:
                    r = await c.request("GET", target, headers=headers)
                    # answered by the backend: the key did not break the request
                    assert (r.status, r.header("x-tag")) == (200, "a"), (target, headers)
                c.close()
            # one select per request (a live backend: no retry), in the requests' order
            assert [bal.keys for bal in made] == [keys]
    run(main())


def test_consistent_cookie_hash_keeps_each_cookie_on_one_backend() -> None:
    """``selection: consistent`` + ``hash_key: "cookie:sid"`` through the load balancer the
    CLI builds (lb.balancer.load_balancer_from_conf, a Ketama ring): a sid reaches the same
    backend on every request, whatever other cookies and connections come with it, and the
    sids spread over both backends, each to the one the ring assigns it."""
    from pyngora.lb.balancer import load_balancer_from_conf

    async def main() -> None:
        async with serving(AppService(HeaderEcho("a"))) as (pa, _), \
                serving(AppService(HeaderEcho("b"))) as (pb, _):
            conf, sc = proxy_conf(f"""
  - name: lb
    type: http_proxy
    listeners: ["127.0.0.1:0"]
    upstreams:
      - name: pool
        selection: consistent
        hash_key: "cookie:sid"
        backends: [{{addr: "127.0.0.1:{pa}"}}, {{addr: "127.0.0.1:{pb}"}}]
""")
            tag_of = {f"127.0.0.1:{pa}": "a", f"127.0.0.1:{pb}": "b"}
            made: list[Any] = []

            def factory(uconf: Any) -> Any:
                made.append(load_balancer_from_conf(uconf, None))  # no health table
                return made[-1]

            async with serving(build_proxy_service(conf, sc, balancer_factory=factory),
                               conf) as (pport, _):
                # The ring hashes "ADDR-J" and the ports are new each run, so which sid goes
                # where is asked of a twin ring over the same backends; 3 sids per backend
                # out of 200 candidates (a miss would need ~197 draws on one side).
                assert len(made) == 1  # the group's balancer is the ring, built once
                twin = load_balancer_from_conf(sc.spec.upstreams[0], None)
                want: dict[str, str] = {}
                for i in range(200):
                    sid = f"s{i:03d}"
                    tag = tag_of[twin.select(sid.encode()).addr]
                    if sum(t == tag for t in want.values()) < 3:
                        want[sid] = tag
                    if len(want) == 6:
                        break
                assert sorted(want.values()) == ["a", "a", "a", "b", "b", "b"], want
                seen: dict[str, list[str]] = {sid: [] for sid in want}
                for round_ in range(3):  # a fresh connection per round: no connection affinity
                    c = await Client.connect(pport)
                    for n, sid in enumerate(want):
                        # other cookies around sid, varying per request, and in round 2 a
                        # second Cookie field: only sid's value may decide
                        cookies = (("Cookie", f"theme=t{round_}{n}; sid={sid}; lang=x{n}"),)
                        if round_ == 2:
                            cookies = (("Cookie", f"theme=t{n}"), ("Cookie", f"sid={sid}"))
                        r = await c.request("GET", f"/p{round_}{n}?q={n}", headers=cookies)
                        assert r.status == 200
                        seen[sid].append(r.header("x-tag"))
                    c.close()
                assert seen == {sid: [tag] * 3 for sid, tag in want.items()}
    run(main())


def test_timeouts_and_retries_from_yaml() -> None:
    async def main() -> None:
        hits: list[int] = []

        async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            hits.append(1)
            await r.read()
            w.close()

        srv = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        conf, sc = proxy_conf(f"""
  - name: slow
    type: http_proxy
    listeners: ["127.0.0.1:0"]
    upstreams:
      - name: s
        backends: [{{addr: "127.0.0.1:{port}"}}]
        timeouts: {{read_seconds: 0.3, connect_seconds: 1}}
        retries: 0
""")
        async with serving(build_proxy_service(conf, sc), conf) as (pport, _):
            c = await Client.connect(pport)
            r = await c.request()
            assert r.status == 504
            assert hits == [1]  # a read timeout is not retried
        srv.close()
    run(main())


class MyApp(ProxyHttp):
    """Loaded by ``app: "tests.protocol.test_proxy_declarative:MyApp"`` with the YAML as ctx."""

    def __init__(self, conf: HttpProxyConf) -> None:
        self.port = int(conf.extra["x-origin-port"])

    async def upstream_peer(self, session: Session, ctx: Any) -> HttpPeer:
        return HttpPeer(f"127.0.0.1:{self.port}")

    async def response_filter(self, session: Session, resp: Any, ctx: Any) -> None:
        resp.insert_header("X-App", "mine")


def test_app_module_class() -> None:
    async def main() -> None:
        async with serving(static()) as (oport, _):
            conf, sc = proxy_conf(f"""
  - name: custom
    type: http_proxy
    listeners: ["127.0.0.1:0"]
    app: "tests.protocol.test_proxy_declarative:MyApp"
    x-origin-port: {oport}
""")
            async with serving(build_proxy_service(conf, sc), conf) as (pport, _):
                c = await Client.connect(pport)
                r = await c.request()
                assert (r.status, r.body, r.header("x-app")) == (200, b"hello", "mine")
    run(main())


def test_a_dns_group_retries_once_per_backend_it_discovered() -> None:
    """``retries`` defaults to one per backend; a DNS group's backends are what it discovered,
    not its (empty) ``backends`` list: a review saw 1 retry for 3 discovered addresses, and a
    502 while one of them was alive."""
    from pyngora.lb import Backend, LoadBalancer
    from pyngora.proxy.declarative import DeclarativeProxy
    _, sc = proxy_conf("""
  - name: gw
    type: http_proxy
    listeners: ["127.0.0.1:0"]
    upstreams:
      - {name: dyn, discovery: {type: dns, name: app.test, port: 80}}
      - {name: fixed, backends: [{addr: "127.0.0.1:1"}, {addr: "127.0.0.1:2"}]}
      - {name: two, retries: 2, discovery: {type: dns, name: app.test}}
    upstream: dyn
""")
    proxy = DeclarativeProxy(sc.spec)
    dyn = proxy.groups["dyn"]
    assert dyn.retries is None and dyn.discovered_retries() == 1  # nothing discovered yet
    dyn.balancer = LoadBalancer([Backend(f"127.0.0.{i}:80") for i in (1, 2, 3)])
    assert dyn.discovered_retries() == 3
    assert proxy.groups["fixed"].retries == 2 and proxy.groups["two"].retries == 2


def test_discovered_backends_are_talked_to_as_the_group_s_template_says() -> None:
    """A DNS group's first ``backends`` entry says how to talk to every discovered address
    (the health check already read it so): TLS, SNI (default: the DNS name), verify. The
    proxy used to dial discovered addresses in plaintext while the check spoke TLS."""
    from pyngora.lb.balancer import discovery_from_conf
    from pyngora.proxy.declarative import DeclarativeProxy
    _, sc = proxy_conf("""
  - name: gw
    type: http_proxy
    listeners: ["127.0.0.1:0"]
    upstreams:
      - name: dyn
        discovery: {type: dns, name: api.test, port: 443}
        backends: [{addr: "template:443", tls: true, verify: false}]
    upstream: dyn
""")
    up = sc.spec.upstreams[0]
    peer = DeclarativeProxy(sc.spec).groups["dyn"].peer("10.0.0.7:443")
    assert (peer.tls, peer.sni, peer.options.verify_cert) == (True, "api.test", False)
    assert discovery_from_conf(up).ext == {"tls": True, "sni": "api.test", "verify": False}


def test_a_retry_skips_the_backends_tried_with_or_without_a_balancer() -> None:
    """``_peer`` remembers each failed attempt's backend (the Session's peer when it is asked
    again) and the pick avoids them while one is left: with the group's balancer, and with
    the bare weighted ring of a DeclarativeProxy built without a balancer factory."""
    from pyngora.lb import Backend, LoadBalancer
    from pyngora.proxy.declarative import DeclarativeProxy
    from pyngora.proxy.session import Session
    _, sc = proxy_conf("""
  - name: gw
    type: http_proxy
    listeners: ["127.0.0.1:0"]
    upstreams:
      - {name: o, backends: [{addr: "127.0.0.1:1", weight: 5}, {addr: "127.0.0.1:2"},
                             {addr: "127.0.0.1:3"}]}
""")

    class _Head:
        body = "none"

    class _Ex:  # what a Session reads of its exchange here
        head = _Head()
        client_addr = server_addr = None
        scheme = "http"

    for with_balancer in (False, True):
        proxy = DeclarativeProxy(sc.spec)
        if with_balancer:
            proxy.groups["o"].balancer = LoadBalancer(
                [Backend("127.0.0.1:1", 5), Backend("127.0.0.1:2"), Backend("127.0.0.1:3")])
        for start in range(8):  # every place in the ring
            session = Session(_Ex(), None)  # type: ignore[arg-type]
            for _ in range(start):
                proxy.groups["o"].pick(session)  # move the ring on
            seen = []
            for attempt in range(4):
                peer = proxy._peer(session)
                seen.append(peer.address)
                session.peer = peer  # as the engine does before the attempt fails
            assert sorted(seen[:3]) == ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"], (
                with_balancer, start, seen)


def test_a_failed_connect_is_tried_once_per_backend(monkeypatch: Any) -> None:
    """nginx tries each server once: after every backend of the group failed to connect for
    this request, no further attempt (a group of one unreachable backend answered after two
    connect timeouts). The spare retry is for a dead pooled connection, not this case."""
    from pyngora.proxy import declarative
    calls: list[str] = []
    real = declarative.DeclarativeProxy.fail_to_connect

    async def counting(self: Any, session: Session, peer: HttpPeer, ctx: Any, e: Any) -> Any:
        calls.append(peer.address)
        return await real(self, session, peer, ctx, e)
    monkeypatch.setattr(declarative.DeclarativeProxy, "fail_to_connect", counting)

    async def main() -> None:
        refused = []
        for _ in range(2):
            dead = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
            refused.append(dead.sockets[0].getsockname()[1])
            dead.close()
            await dead.wait_closed()
        for n in (1, 2):
            backends = ", ".join(f'{{addr: "127.0.0.1:{p}"}}' for p in refused[:n])
            conf, sc = proxy_conf(f"""
  - name: lb
    type: http_proxy
    listeners: ["127.0.0.1:0"]
    upstreams:
      - {{name: pool, backends: [{backends}]}}
""")
            calls.clear()
            async with serving(build_proxy_service(conf, sc), conf) as (pport, _):
                c = await Client.connect(pport)
                assert (await c.request()).status == 502
                c.close()
            assert sorted(calls) == sorted(f"127.0.0.1:{p}" for p in refused[:n]), (n, calls)
    run(main())
