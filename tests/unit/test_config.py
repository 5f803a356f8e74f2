"""Configuration: every key, its default, and every kind of error naming file:line:key."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pyngora.config.loader import load, parse_text
from pyngora.config.schema import (ConfigError, HttpProxyConf, ServerConf, StaticConf,
                                   parse_address)

FULL = """\
version: 1
daemon: false
error_log: /tmp/err.log
pid_file: /run/p.pid
upgrade_sock: /run/u.sock
user: nobody
group: nogroup
working_directory: /tmp
threads: 3
work_stealing: false
ca_file: /etc/ssl/certs/ca-certificates.crt
grace_period_seconds: 12
graceful_shutdown_timeout_seconds: 2.5
upstream_keepalive_pool_size: 64
max_retries: 4
upgrade_timeout_seconds: 9
access_log: stdout
access_log_format: json
log_level: debug
metrics_dir: /tmp/m
x-team: edge
services:
  - name: proxy
    type: http_proxy
    threads: 2
    work_stealing: true
    listeners:
      - address: "0.0.0.0:80"
        backlog: 511
      - {address: "[::1]:8443", tls: {cert: /c.pem, key: /k.pem}}
      - {address: "unix:/run/p.sock", mode: "0660"}
      - {address: "127.0.0.1:8080", h2c: true}
    upstreams:
      - name: api
        backends: [{addr: "10.0.0.1:80", weight: 3}, {addr: "10.0.0.2:80", tls: true, sni: api, verify: false}]
        selection: consistent
        hash_key: "header:x-user"
        health_check: {type: tcp, path: /healthz, expect_status: 204, interval_seconds: 2,
                       timeout_seconds: 1, healthy_after: 2, unhealthy_after: 3}
        timeouts: {connect_seconds: 1, total_connect_seconds: 3, read_seconds: 30,
                   write_seconds: 20, idle_seconds: 10}
        retries: 2
        h2: true
      - name: dns
        discovery: {type: dns, name: api.default.svc.cluster.local, port: 8080, record: SRV,
                    refresh_seconds: 5}
    routes:
      - {host: api.example.com, path_prefix: /v1, upstream: api}
      - {path_prefix: /, upstream: dns}
    request_headers: {set: {x-a: "1"}, add: {x-b: "2"}, remove: [x-c]}
    response_headers: {remove: [server]}
    limits: {max_header_bytes: 8192, max_body_bytes: 1000000, header_read_timeout_seconds: 5,
             keepalive_timeout_seconds: 30, keepalive_requests: 100,
             h2_max_concurrent_streams: 64}
    forwarded_headers: true
    x-note: mine
  - name: origin
    type: static
    listeners: ["127.0.0.1:6189"]
    status: 201
    headers: {content-type: text/plain}
    body: hi
  - {name: metrics, type: prometheus, listeners: ["127.0.0.1:6192"]}
  - {name: bg, type: background, app: "mymod:Task"}
"""


def test_every_key_parses() -> None:
    c = parse_text(FULL, "full.yaml")
    assert (c.threads, c.work_stealing, c.grace_period_seconds) == (3, False, 12.0)
    assert c.graceful_shutdown_timeout_seconds == 2.5
    assert (c.upstream_keepalive_pool_size, c.max_retries, c.upgrade_timeout_seconds) == (64, 4, 9.0)
    assert (c.access_log, c.access_log_format, c.log_level) == ("stdout", "json", "debug")
    assert (c.user, c.group, c.pid_file, c.upgrade_sock) == ("nobody", "nogroup", "/run/p.pid", "/run/u.sock")
    assert c.metrics_path == "/tmp/m"
    proxy, origin, metrics, bg = c.services
    assert proxy.threads == 2 and proxy.work_stealing is True
    l0, l1, l2, l3 = proxy.listeners
    assert (l0.host, l0.port, l0.backlog) == ("0.0.0.0", 80, 511)
    assert l1.host == "::1" and l1.tls.cert == "/c.pem" and l1.tls.alpn == ("h2", "http/1.1")
    assert l2.family == "unix" and l2.mode == 0o660 and l2.key == "unix:/run/p.sock"
    assert l3.h2c is True
    spec = proxy.spec
    assert isinstance(spec, HttpProxyConf)
    api, dns = spec.upstreams
    assert api.backends[0].weight == 3 and api.backends[1].verify is False
    assert api.selection == "consistent" and api.hash_key == "header:x-user"
    assert api.health_check.unhealthy_after == 3 and api.timeouts.total_connect_seconds == 3
    assert api.h2 is True and api.retries == 2
    assert dns.discovery.record == "SRV" and dns.discovery.port == 8080
    assert spec.routes[0].path_prefix == "/v1" and spec.routes[1].upstream == "dns"
    assert spec.request_headers.set == (("x-a", "1"),) and spec.request_headers.remove == ("x-c",)
    assert spec.limits.keepalive_requests == 100 and spec.forwarded_headers is True
    assert spec.limits.h2_max_concurrent_streams == 64
    assert spec.extra == {"x-note": "mine"}
    assert isinstance(origin.spec, StaticConf) and origin.spec.status == 201
    assert bg.spec.app == "mymod:Task" and bg.listeners == ()
    assert metrics.type == "prometheus"


def test_defaults_are_pingoras() -> None:
    c = parse_text("services: []\n", "d.yaml")
    assert c == ServerConf(source="d.yaml")
    assert (c.version, c.daemon, c.pid_file, c.upgrade_sock) == (1, False, "/tmp/pyngora.pid", "/tmp/pyngora_upgrade.sock")
    assert (c.threads, c.work_stealing, c.grace_period_seconds) == (1, True, 300.0)
    assert (c.graceful_shutdown_timeout_seconds, c.upstream_keepalive_pool_size, c.max_retries) == (5.0, 128, 16)
    assert (c.upgrade_timeout_seconds, c.access_log, c.access_log_format, c.log_level) == (30.0, "off", "combined", "info")


def test_threads_auto() -> None:
    assert parse_text("threads: auto\n", "a.yaml").threads == (os.cpu_count() or 1)


@pytest.mark.parametrize("text,expect", [
    ("threads: 2\ngrace_period_secs: 3\n", "e.yaml:2: grace_period_secs: unknown key (did you mean 'grace_period_seconds'?)"),
    ("threads: two\n", "e.yaml:1: threads: expected an integer, got 'two'"),
    ("daemon: yes please\n", "e.yaml:1: daemon: expected true or false"),
    ("services:\n  - name: a\n    type: statik\n    listeners: ['127.0.0.1:1']\n",
     "e.yaml:3: services[0].type: must be one of http_proxy, static, prometheus, background (did you mean 'static'?)"),
    ("services:\n  - name: a\n    type: static\n    listeners: ['nope']\n",
     "e.yaml:4: services[0].listeners[0]: expected HOST:PORT, got 'nope'"),
    ("services:\n  - name: a\n    type: static\n    listeners: ['127.0.0.1:1']\n    staus: 3\n",
     "e.yaml:5: services[0].staus: unknown key (did you mean 'status'?)"),
    ("services:\n  - name: p\n    type: http_proxy\n    listeners: ['127.0.0.1:1']\n    upstreams:\n"
     "      - name: u\n        backends: [{addr: 'h:1', wieght: 2}]\n",
     "e.yaml:7: services[0].upstreams[0].backends[0].wieght: unknown key (did you mean 'weight'?)"),
    ("services:\n  - name: p\n    type: http_proxy\n    listeners: ['127.0.0.1:1']\n    upstreams: [{name: u, backends: [{addr: 'h:1'}]}]\n"
     "    routes: [{path_prefix: /, upstream: nope}]\n",
     "e.yaml:6: services[0].routes[0].upstream: no upstream group named 'nope'"),
    ("access_log_format: xml\n", "e.yaml:1: access_log_format: must be one of combined, json; got 'xml'"),
    ("grace_period_seconds: -1\n", "e.yaml:1: grace_period_seconds: must not be negative"),
    ("a: [1,\n", "e.yaml:2: (top level): invalid YAML"),
    ("pid_file: /a\npid_file: /b\n", "e.yaml:2: pid_file: duplicate key"),
    ("services:\n  - {name: s, type: static}\n", "e.yaml:2: services[0].listeners: a static service needs at least one listener"),
])
def test_error_names_file_line_key(text: str, expect: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_text(text, "e.yaml")
    assert expect in str(e.value)


def test_every_error_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as e:
        parse_text("thread: 1\nlog_levl: info\nmax_retries: x\n", "e.yaml")
    assert len(e.value.issues) == 3


def test_x_keys_are_the_users() -> None:
    parse_text("x-anything: {deep: [1, 2]}\n", "x.yaml")


def test_addresses() -> None:
    assert parse_address("[::]:443").host == "::"
    assert parse_address("*:80").host == "0.0.0.0"
    for bad in ("80", "host:port", "unix:relative", "[::1]443", "1.2.3.4:70000"):
        with pytest.raises(ValueError):
            parse_address(bad)


def test_unreadable_file(tmp_path) -> None:
    with pytest.raises(ConfigError) as e:
        load(str(tmp_path / "missing.yaml"))
    assert "missing.yaml" in str(e.value) and "cannot read" in str(e.value)


def test_dash_t_cli(tmp_path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("services:\n  - {name: o, type: static, listeners: ['127.0.0.1:1'], body: hi}\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("services:\n  - {name: o, type: static, listeners: ['127.0.0.1:1'], bdy: hi}\n")
    run = lambda f: subprocess.run([sys.executable, "-m", "pyngora", "-t", "-c", str(f)],
                                   capture_output=True, text=True, timeout=60)
    ok = run(good)
    assert ok.returncode == 0 and f"configuration {good} is ok" in ok.stdout
    ko = run(bad)
    assert ko.returncode == 1
    assert f"{bad}:2: services[0].bdy: unknown key (did you mean 'body'?)" in ko.stderr


def test_a_static_status_must_be_a_final_one() -> None:
    """A 1xx as a static service's only answer would make the next pipelined response seem
    to answer the request."""
    assert "services[0].status: must be between 200 and 599, got 103" in _errors(
        "services:\n  - {name: s, type: static, listeners: ['127.0.0.1:1'], status: 103}\n")


@pytest.mark.parametrize("n", [0, 1001])
def test_h2_max_concurrent_streams_is_bounded(n: int) -> None:
    """0 would refuse every stream; above 1,000 a client's stalled streams could hold
    hundreds of MiB of a worker (~270 KiB each until send_timeout)."""
    assert (f"c.yaml:3: services[0].limits.h2_max_concurrent_streams: must be between 1 and "
            f"1000, got {n}") in _errors(
        "services:\n  - {name: s, type: static, listeners: ['127.0.0.1:1'], body: hi,\n"
        f"     limits: {{h2_max_concurrent_streams: {n}}}}}\n")


def test_request_header_edits_may_not_touch_the_connection_or_the_framing() -> None:
    """A configured "connection: close" was sent while the connection was pooled; a removed
    Host made an invalid HTTP/1.1 request. Host may be set."""
    text = _errors(
        "services:\n  - name: p\n    type: http_proxy\n    listeners: ['127.0.0.1:1']\n"
        "    upstreams: [{name: o, backends: [{addr: '127.0.0.1:2'}]}]\n"
        "    request_headers: {set: {Connection: close, Host: h, x-a: b}, remove: [host],"
        " add: {transfer-encoding: chunked}}\n")
    assert "request_headers.set.Connection: connection is the connection's" in text, text
    assert "request_headers.remove.host: an HTTP/1.1 request needs a Host" in text, text
    assert "request_headers.add.transfer-encoding:" in text, text
    assert "set.Host" not in text and "x-a" not in text, text


def test_dash_t_prints_every_error_in_one_run(tmp_path) -> None:
    """SPEC 2: -t prints every error. A file with a key error in one service still has the
    other services built (certificates, imports), so their errors show in the same run; a
    service with an issue of its own is not built."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "services:\n"
        "  - name: tls\n    type: static\n    body: hi\n    listeners:\n"
        f"      - {{address: '127.0.0.1:1', tls: {{cert: {tmp_path}/no.crt, key: {tmp_path}/no.key}}}}\n"
        "  - name: p\n    type: http_proxy\n    listeners: ['127.0.0.1:2']\n"
        "    upstreams: [{name: o, backends: [{addr: '127.0.0.1:3', weight: 0}]}]\n"
        "  - {name: bg, type: background, app: 'no_such_module_here:App'}\n"
        "  - {name: bg2, type: background, app: 'no_such_module_either:App', bad_key: 1}\n")
    ko = subprocess.run([sys.executable, "-m", "pyngora", "-t", "-c", str(bad)],
                        capture_output=True, text=True, timeout=60)
    assert ko.returncode == 1
    lines = ko.stderr.splitlines()
    assert f"{bad}:6: services[0].listeners[0].tls.cert: certificate file {tmp_path}/no.crt does not exist" in lines
    assert f"{bad}:10: services[1].upstreams[0].backends[0].weight: must be at least 1, got 0" in lines
    assert any(ln.startswith(f"{bad}:11: services[2].app: no_such_module_here:App: No module "
                             "named 'no_such_module_here'") for ln in lines), lines
    assert any("bad_key: unknown key" in ln for ln in lines), lines
    assert not any("no_such_module_either" in ln for ln in lines), lines  # not built
    assert lines[-1] == f"configuration {bad} test failed"


def test_dash_t_finds_what_the_machine_lacks_and_a_start_says_it_in_one_line(tmp_path) -> None:
    """A user or group that does not exist, a log file in a directory that does not, a
    missing working directory: -t used to say ok, and the start then failed with a
    traceback (or, for the access log, crash-looped its workers)."""
    conf = tmp_path / "env.yaml"
    conf.write_text("user: no_such_user_here\ngroup: no_such_group_here\n"
                    f"error_log: {tmp_path}/none/e.log\naccess_log: {tmp_path}/none2/a.log\n"
                    f"working_directory: {tmp_path}/none3\n"
                    "services:\n  - {name: s, type: static, listeners: ['127.0.0.1:0']}\n")
    for args in (["-t"], []):
        ko = subprocess.run([sys.executable, "-m", "pyngora", *args, "-c", str(conf)],
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert ko.returncode == 1, (args, ko.stderr)
        lines = ko.stderr.splitlines()
        assert lines[:5] == [
            f"{conf}:1: user: no such user 'no_such_user_here'",
            f"{conf}:2: group: no such group 'no_such_group_here'",
            f"{conf}:3: error_log: directory {tmp_path}/none does not exist",
            f"{conf}:4: access_log: directory {tmp_path}/none2 does not exist",
            f"{conf}:5: working_directory: {tmp_path}/none3 is not a directory"], lines
        assert "Traceback" not in ko.stderr


def test_a_file_with_no_service_is_refused(tmp_path) -> None:
    for text in ("", "version: 1\n", "services: []\n"):
        conf = tmp_path / "empty.yaml"
        conf.write_text(text)
        ko = subprocess.run([sys.executable, "-m", "pyngora", "-t", "-c", str(conf)],
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert ko.returncode == 1 and "services: no service to run" in ko.stderr, (text, ko.stderr)


# -- what an operator's YAML may hold, found by an attack review --------------------------

def _errors(text: str) -> str:
    with pytest.raises(ConfigError) as e:
        parse_text(text, "c.yaml")
    return str(e.value)


def test_an_alias_bomb_is_refused_quickly() -> None:
    """Aliases of aliases ("billion laughs"): refused once a million values were expanded,
    instead of growing the master (SIGHUP parses in the master) without bound."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    text = "\n".join("x-" + line for line in lines) + "\n"
    assert "aliases are expanded (an alias bomb?)" in _errors(text)


def test_merge_keys_work_and_explicit_keys_win() -> None:
    c = parse_text("x-d: &d {type: static, body: merged, listeners: ['127.0.0.1:1']}\n"
                   "services:\n  - <<: *d\n    name: a\n    body: own\n", "m.yaml")
    svc = c.services[0]
    assert svc.type == "static" and svc.spec.body == "own"


@pytest.mark.parametrize("text,expected", [
    ("version: !!int abc\n", "c.yaml:1: version: cannot read 'abc'"),
    ("x-a: !custom 1\n", "c.yaml:1: x-a: cannot read '1'"),
    ("threads: 1\nnull: 3\n", "c.yaml:2: (top level): a key must be a plain name"),
    ("? {a: 1}\n: 2\n", "c.yaml:1: (top level): a key must be a plain name"),
])
def test_unreadable_yaml_is_an_error_with_file_and_line(text: str, expected: str) -> None:
    assert expected in _errors(text)


def test_a_duplicate_key_does_not_hide_the_other_errors() -> None:
    out = _errors("threads: 1\nthreads: 2\nthreadz: 3\nmax_retries: x\n")
    assert "c.yaml:2: threads: duplicate key" in out
    assert "threadz: unknown key" in out and "max_retries: expected an integer" in out


def test_a_file_that_is_not_utf8_names_its_line(tmp_path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_bytes(b"threads: 1\nx-a: caf\xe9\n")
    with pytest.raises(ConfigError) as e:
        load(str(p))
    assert "bad.yaml:2" in str(e.value) and "not UTF-8" in str(e.value)


def test_a_listener_in_two_places_is_refused_by_the_check() -> None:
    """-t said ok, the master then failed to bind (with no line): now -t says where."""
    out = _errors("services:\n"
                  "  - {name: a, type: static, listeners: ['127.0.0.1:20010']}\n"
                  "  - {name: b, type: static, listeners: ['0.0.0.0:20010', 'unix:/tmp/s']}\n"
                  "  - {name: c, type: static, listeners: ['unix:/tmp/s', '[::]:20010']}\n")
    assert "c.yaml:3: services[1].listeners[0]: 0.0.0.0:20010 is already a listener of " \
           "service 'a'" in out
    assert "services[2].listeners[0]: unix:/tmp/s is already a listener of service 'b'" in out
    assert "[::]:20010" not in out  # IPv6 listeners are V6ONLY: no clash with IPv4


@pytest.mark.parametrize("text,expected", [
    ("grace_period_seconds: .nan\n", "grace_period_seconds: expected a finite number"),
    ("upgrade_timeout_seconds: .inf\n", "upgrade_timeout_seconds: expected a finite number"),
    ("upgrade_timeout_seconds: 0\n", "upgrade_timeout_seconds: must be more than 0"),
    ("services:\n  - name: p\n    type: http_proxy\n    listeners: ['127.0.0.1:1']\n"
     "    upstreams: [{name: o, backends: [{addr: 'a:1'}], health_check: {type: tcp, "
     "interval_seconds: 0, healthy_after: 0, expect_status: 999}}]\n",
     "interval_seconds: must be more than 0"),
])
def test_values_that_would_break_the_server_are_refused(text: str, expected: str) -> None:
    assert expected in _errors(text)


def test_a_backend_weight_of_0_is_refused_by_the_check() -> None:
    """-t said ok, then every worker failed to boot on it (exit 3)."""
    out = _errors("services:\n  - name: p\n    type: http_proxy\n    listeners: ['127.0.0.1:1']\n"
                  "    upstreams: [{name: o, backends: [{addr: 'a:1', weight: 0}]}]\n")
    assert "c.yaml:5: services[0].upstreams[0].backends[0].weight: must be at least 1" in out


def _hash_key_conf(hash_key: str) -> str:
    """A proxy whose one upstream group hashes on ``hash_key`` (line 7 of the file)."""
    return ("services:\n  - name: p\n    type: http_proxy\n    listeners: ['127.0.0.1:1']\n"
            "    upstreams:\n      - name: o\n"
            # JSON's string is YAML's double-quoted one: a tab in it is a tab
            f"        hash_key: {json.dumps(hash_key)}\n        backends: [{{addr: 'a:1'}}]\n")


@pytest.mark.parametrize("hash_key", ["header:", "cookie:", "header:   ", "cookie:\t"])
def test_a_hash_key_header_or_cookie_needs_a_name(hash_key: str) -> None:
    """``header:`` / ``cookie:`` with an empty (or blank) NAME passed the check, and then
    hashed b"" for every request: every client on one backend. Now the check refuses it,
    naming the file, the line and the key, like the other hash_key errors."""
    kind = hash_key[:6]
    out = _errors(_hash_key_conf(hash_key))
    assert (f"c.yaml:7: services[0].upstreams[0].hash_key: {kind}:NAME needs a NAME "
            f"(e.g. {kind}:x-user), got {hash_key!r}") in out


def test_hash_key_names_and_kinds_the_check_accepts_or_refuses() -> None:
    """The refusal above is for a missing NAME only: named ones (padded too, as _key_fn
    strips them) and the plain kinds still load, and an unknown kind keeps its message."""
    for ok in ("uri", "path", "client_ip", "header:x-user", "cookie:sid", "header: X-User "):
        assert parse_text(_hash_key_conf(ok), "c.yaml").services[0].spec.upstreams[0].hash_key == ok
    assert ("c.yaml:7: services[0].upstreams[0].hash_key: must be uri, path, client_ip, "
            "header:NAME or cookie:NAME") in _errors(_hash_key_conf("host"))


def test_dash_t_refuses_a_hash_key_without_a_name(tmp_path) -> None:
    """``pyngora -t`` (what an operator runs before a reload) says so and exits 1."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(_hash_key_conf("cookie:"))
    ko = subprocess.run([sys.executable, "-m", "pyngora", "-t", "-c", str(bad)],
                        capture_output=True, text=True, timeout=60)
    assert ko.returncode == 1, ko.stdout + ko.stderr
    assert (f"{bad}:7: services[0].upstreams[0].hash_key: cookie:NAME needs a NAME "
            f"(e.g. cookie:x-user), got 'cookie:'") in ko.stderr


def test_unquoted_off_is_access_log_off() -> None:
    """SPEC and README write ``access_log: off``; YAML 1.1 reads that unquoted as false."""
    c = parse_text("access_log: off\nservices: []\n", "o.yaml")
    assert c.access_log == "off"
    with pytest.raises(ConfigError) as e:
        parse_text("access_log: on\nservices: []\n", "o.yaml")
    assert "o.yaml:1: access_log: expected a string, got True" in str(e.value)


def test_relative_paths_are_the_config_files_directorys() -> None:
    """As pid_file and ca_file, a listener's TLS certificate and key (and its SNI ones) are
    taken from the configuration file's directory: -t, -d (which changes to /) and SIGHUP
    then read the same files, wherever pyngora was started."""
    c = parse_text("pid_file: run/p.pid\nca_file: ca.pem\nservices:\n"
                   "  - name: s\n    type: static\n    listeners:\n"
                   "      - {address: '127.0.0.1:8443', tls: {cert: c.pem, key: keys/k.pem,"
                   " sni: [{server_name: a.test, cert: /abs/a.pem, key: a.key}]}}\n"
                   "      - '127.0.0.1:8080'\n", "/etc/pyngora/p.yaml")
    assert (c.pid_file, c.ca_file) == ("/etc/pyngora/run/p.pid", "/etc/pyngora/ca.pem")
    tls = c.services[0].listeners[0].tls
    assert (tls.cert, tls.key) == ("/etc/pyngora/c.pem", "/etc/pyngora/keys/k.pem")
    assert [(s.cert, s.key) for s in tls.sni] == [("/abs/a.pem", "/etc/pyngora/a.key")]
    assert c.services[0].listeners[1].tls is None
