"""The YAML upstream groups -> prober groups and worker load balancers."""
from __future__ import annotations

from typing import Any

from pyngora.config.loader import parse_text
from pyngora.lb import Backend, Consistent, DnsDiscovery, HttpHealthCheck, TcpHealthCheck
from pyngora.lb.balancer import (health_group_from_conf, load_balancer_from_conf)
from pyngora.lb.health_table import HealthTable

YAML = """
services:
  - name: web
    type: http_proxy
    listeners: [{address: "127.0.0.1:0"}]
    upstream: api
    upstreams:
      - name: api
        selection: consistent
        backends:
          - {addr: "127.0.0.1:9001", weight: 2, tls: true, sni: api.example}
          - {addr: "127.0.0.1:9002", tls: true}
        health_check: {type: http, path: /healthz, unhealthy_after: 3, interval_seconds: 2}
      - name: dyn
        discovery: {type: dns, name: app.svc.cluster.local, port: 8080, record: A,
                    refresh_seconds: 5, resolver: "10.96.0.10:5353"}
        health_check: {type: tcp}
"""


def upstreams() -> Any:
    return parse_text(YAML, "t.yaml").services[0].spec.upstreams


def test_static_group_from_conf(tmp_path: Any) -> None:
    api = upstreams()[0]
    group = health_group_from_conf(api)
    check = group.health_check
    assert isinstance(check, HttpHealthCheck)
    # each backend is checked as the proxy talks to it: tls, sni and verify come from its
    # own ext (below), not from one setting for the whole group
    assert (check.host, check.path, check.unhealthy_after) == (None, "/healthz", 3)
    assert group.interval_seconds == 2.0 and group.refresh_seconds is None
    assert [b.addr for b in group.backends.get()] == ["127.0.0.1:9001", "127.0.0.1:9002"]

    path = str(tmp_path / "h.tbl")
    writer = HealthTable.create(path)
    writer.set_group("api", group.backends.get())
    writer.set("api/127.0.0.1:9001", False)
    lb = load_balancer_from_conf(api, path)
    assert isinstance(lb._sel, Consistent)
    picked = lb.select(b"/x")
    assert picked == Backend("127.0.0.1:9002") and picked.ext["tls"] is True
    writer.set("api/127.0.0.1:9001", True)
    b = next(b for b in lb.backends() if b.addr == "127.0.0.1:9001")
    assert b.weight == 2 and b.ext == {"tls": True, "sni": "api.example", "verify": True}
    lb.close()
    writer.close()


def test_dns_group_from_conf() -> None:
    dyn = upstreams()[1]
    group = health_group_from_conf(dyn)
    disc = group.backends.discovery
    assert isinstance(disc, DnsDiscovery) and isinstance(group.health_check, TcpHealthCheck)
    assert (disc.name, disc.port, disc.kind, disc.refresh_seconds) == \
        ("app.svc.cluster.local", 8080, "A", 5.0)
    assert disc.client.conf.nameservers == [("10.96.0.10", 5353)]
    assert group.refresh_seconds == 5.0
    lb = load_balancer_from_conf(dyn, None)
    assert lb.backends() == () and lb.select(b"") is None  # until the prober publishes
