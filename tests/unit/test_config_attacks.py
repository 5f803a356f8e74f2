"""Malformed configurations found by an attack review of the loader, the schema and ``-t``.

The rule (SPEC 5, README "Configuration"): a bad config names the file, the line and the key;
``pyngora -t`` exits 1 with ``FILE:LINE: key.path: message`` lines, never a traceback, and
never says ok for a file that cannot work (one that fails only at start, or serves nothing).
Each test here failed when it was written; its docstring says what is expected instead.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import pytest

from pyngora.config.loader import parse_text
from pyngora.config.schema import ConfigError

STATIC = "services:\n  - {name: s, type: static, listeners: ['127.0.0.1:0']}\n"


def _errors(text: str) -> str:
    with pytest.raises(ConfigError) as e:
        parse_text(text, "c.yaml")
    return str(e.value)


def _issues(text: str) -> list:
    with pytest.raises(ConfigError) as e:
        parse_text(text, "c.yaml")
    return e.value.issues


def _dash_t(tmp_path, text: str, name: str = "c.yaml",
            preexec=None, timeout: float = 60) -> tuple[subprocess.CompletedProcess, str]:
    conf = tmp_path / name
    conf.write_text(text)
    ko = subprocess.run([sys.executable, "-m", "pyngora", "-t", "-c", str(conf)],
                        capture_output=True, text=True, timeout=timeout,
                        stdin=subprocess.DEVNULL, preexec_fn=preexec)
    return ko, str(conf)


def _proxy(extra: str, upstream: str = "      - {name: u, backends: [{addr: '127.0.0.1:1'}]}\n"
           ) -> str:
    """A proxy service (line 2) whose upstreams list starts on line 6; ``extra`` follows."""
    return ("services:\n  - name: p\n    type: http_proxy\n    listeners: ['127.0.0.1:0']\n"
            "    upstreams:\n" + upstream + extra)


# --------------------------------------------------------------------- the YAML itself

@pytest.mark.parametrize("text", [
    "x-a: &a [*a]\n",                        # a sequence that contains itself
    "x-a: &a\n  b: *a\n",                    # a mapping that contains itself
    "x-a: " + "[" * 5000 + "]" * 5000 + "\n",  # nesting deeper than the recursion limit
])
def test_a_self_referencing_alias_or_deep_nesting_is_a_config_error(text: str) -> None:
    """``-t`` printed a RecursionError traceback (parse_text lets it out of compose and of
    _Plain.node). Expected: a ConfigError naming the file and line ("an alias that contains
    itself", "nested too deep")."""
    assert "c.yaml:1" in _errors(text)


@pytest.mark.parametrize("text", [
    "x-a: !!python/object/apply:os.system ['true']\n",
    "x-a: !!python/object:os.stat_result {a: 1}\n",
    "x-a: !!set {a, b}\n",
])
def test_tags_on_sequences_and_mappings_are_refused_like_tags_on_scalars(text: str) -> None:
    """``x-a: !custom 1`` is refused ("cannot read"), but a tag on a sequence or a mapping
    was silently ignored (_Plain.node never looks at the tag of a collection): a file with
    ``!!python/object/apply:os.system [...]`` passed -t. Expected: the same refusal, with
    line and key, for any tag the safe loader does not construct for collections."""
    assert "c.yaml:1: x-a: cannot read" in _errors(text + STATIC)


def test_a_merge_key_does_not_move_the_lines_of_the_mapping_and_its_own_keys() -> None:
    """With ``<<: *d``, _Plain.mapping visits the merged node with the mapping's own path,
    which overwrites the line of the mapping and of keys written explicitly: errors named
    the anchor's line (1) instead of 6 and 7 here, and 'services[1].name: required' named 1
    instead of 9. Expected: explicit keys keep their lines, the mapping keeps its own."""
    out = _errors("x-d: &d {bdy: 1, threads: 2}\nservices:\n  - name: s\n    type: static\n"
                  "    listeners: ['127.0.0.1:0']\n    bdy: x\n    threads: 0\n    <<: *d\n")
    assert "c.yaml:6: services[0].bdy: unknown key" in out, out
    assert "c.yaml:7: services[0].threads:" in out, out
    out = _errors("x-d: &d\n  type: static\n  listeners: ['127.0.0.1:0']\n\nservices:\n"
                  "  - name: ok\n    type: static\n    listeners: ['127.0.0.1:1']\n"
                  "  - <<: *d\n    body: hi\n")
    assert "c.yaml:9: services[1].name:" in out, out


def test_a_reader_error_names_its_line_on_one_line() -> None:
    """A NUL or other control character gave 'c.yaml: (top level): invalid YAML:
    unacceptable character #x0000 ... in "<unicode string>", position 11': no line, and a
    second line of PyYAML internals (ReaderError has a position, not a problem_mark).
    Expected: ``c.yaml:2: (top level): invalid YAML: ...`` on one line."""
    out = _errors("threads: 1\n\x00\n")
    assert out.startswith("c.yaml:2: "), out
    assert "\n" not in out and "<unicode string>" not in out, out


def test_an_exponent_without_a_dot_is_read_as_seconds_or_explained() -> None:
    """YAML 1.1 reads ``1e3`` as a string, so ``grace_period_seconds: 1e3`` got "expected
    a number of seconds, got '1e3'", which reads as nonsense to whoever wrote a number.
    Expected: 1000 seconds (as YAML 1.2 and JSON read it), or a message that says how to
    write it (1000 or 1.0e+3)."""
    try:
        conf = parse_text("grace_period_seconds: 1e3\n", "c.yaml")
    except ConfigError as e:
        assert "1000" in str(e) or "1.0e+3" in str(e), str(e)
    else:
        assert conf.grace_period_seconds == 1000.0


# --------------------------------------------------------------------- values and ranges

def test_a_huge_backend_weight_neither_hangs_nor_exhausts_memory(tmp_path) -> None:
    """``weight: 1000000000000000000000000000000`` made -t hang, growing without bound:
    _Group.__init__ (proxy/declarative.py) builds ``[addr] * weight`` (a weight of 10**8 is
    ~800 MB in every worker). Under a 1 GiB limit it ended as "service 'p': " (an empty
    MemoryError). Expected: the weight bounded by the schema (file, line, key) or the ring
    capped as selection._weighted_order caps its array; either way -t answers quickly."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
    ko, conf = _dash_t(tmp_path, _proxy("", "      - name: u\n        backends:\n"
                                            "          - {addr: '127.0.0.1:1', "
                                            "weight: 1000000000000000000000000000000}\n"),
                       preexec=limit, timeout=30)
    assert "Traceback" not in ko.stderr, ko.stderr
    if ko.returncode != 0:
        assert f"{conf}:8: services[0].upstreams[0].backends[0].weight:" in ko.stderr, ko.stderr


@pytest.mark.parametrize("key", ["connect_seconds", "total_connect_seconds"])
def test_a_zero_connect_timeout_is_refused(key: str) -> None:
    """``timeouts: {connect_seconds: 0}`` passed -t and every request got 504 (the connect
    is given 0 s). README: "zero intervals and timeouts ... are refused". Expected: refused
    like interval_seconds: 0 ("must be more than 0"), with file, line and key."""
    out = _errors(_proxy("", "      - {name: u, backends: [{addr: '127.0.0.1:1'}],\n"
                             f"         timeouts: {{{key}: 0}}}}\n"))
    assert f"c.yaml:7: services[0].upstreams[0].timeouts.{key}: must be more than 0" in out, out


def test_max_header_bytes_fits_http2_settings() -> None:
    """``max_header_bytes: 4294967296`` passed -t; it is sent as SETTINGS_MAX_HEADER_LIST_SIZE
    (32 bits), so every HTTP/2 connection died with "struct.error: argument out of range"
    (a traceback in the worker's log). Expected: an upper bound in the schema."""
    out = _errors("services:\n  - {name: s, type: static, listeners: ['127.0.0.1:0'],\n"
                  "     limits: {max_header_bytes: 4294967296}}\n")
    assert "c.yaml:3: services[0].limits.max_header_bytes: must be" in out, out


@pytest.mark.parametrize("text,key", [
    ("threads: 1000000000000000000000000000000\n" + STATIC, "threads"),
    ("services:\n  - {name: s, type: static, listeners: ['127.0.0.1:0'],"
     " threads: 1000000000000000000000000000000}\n", "services[0].threads"),
])
def test_threads_are_bounded(text: str, key: str) -> None:
    """10**30 worker processes per service passed -t (the master would fork until the
    machine runs out, or, pinned, bind until EMFILE). Expected: an upper bound."""
    out = _errors(text)
    assert "c.yaml:" in out and f" {key}: " in out, out


def test_a_negative_threads_is_one_error() -> None:
    """``threads: -3`` gave two errors for one key ("must be at least 1 (or auto)" and
    "must not be negative, got -3"). Expected: one."""
    assert len([i for i in _issues("threads: -3\n") if i.key == "threads"]) == 1


def test_an_upgrade_timeout_python_sockets_cannot_take_is_refused() -> None:
    """``upgrade_timeout_seconds: 10000000000`` passed -t; on an upgrade the new master's
    accept_sockets and the old master's send_sockets (in its hand-over thread) call
    socket.settimeout with it: OverflowError "timestamp out of range for platform time_t",
    uncaught. Expected: an upper bound in the schema."""
    assert "c.yaml:1: upgrade_timeout_seconds: must be" in _errors(
        "upgrade_timeout_seconds: 10000000000\n" + STATIC)


def test_an_invalid_dns_resolver_is_refused() -> None:
    """``resolver: "127.0.0.1:99999"`` passed -t, then every discovery round failed and the
    group had no backend (503). Expected: HOST:PORT checked like an address."""
    out = _errors(_proxy("", "      - name: u\n        discovery: {type: dns, name: a.test,"
                             " resolver: '127.0.0.1:99999'}\n"))
    assert "c.yaml:7: services[0].upstreams[0].discovery.resolver:" in out, out


# --------------------------------------------------------------------- listeners

@pytest.mark.parametrize("stype,extra", [
    ("static", ""), ("prometheus", ""),
    ("http_proxy", ", upstreams: [{name: u, backends: [{addr: '127.0.0.1:1'}]}]"),
])
def test_an_empty_listener_list_is_refused_like_a_missing_one(stype: str, extra: str) -> None:
    """No ``listeners`` key: "a static service needs at least one listener". ``listeners:
    []`` passed -t, and the server started a worker that listens nowhere. Expected: the same
    refusal."""
    out = _errors(f"services:\n  - {{name: s, type: {stype}, listeners: []{extra}}}\n")
    assert f"c.yaml:2: services[0].listeners: a {stype} service needs at least one listener" \
        in out, out


@pytest.mark.parametrize("address", ["[zzz]:8080", "999.1.1.1:8080", " 127.0.0.1:8080"])
def test_a_listener_host_that_is_no_address_is_refused(address: str) -> None:
    """These passed -t and the start failed with "cannot listen on ...: Name or service not
    known" (no file or line): a bracketed host that is not IPv6, an IPv4 literal out of
    range, a blank before the host. Expected: parse_address refuses them."""
    out = _errors(f"services:\n  - {{name: s, type: static, listeners: ['{address}']}}\n")
    assert "c.yaml:2: services[0].listeners[0]:" in out, out


def test_one_address_spelled_twice_is_one_listener_in_two_places() -> None:
    """127.0.0.1 and 127.000.000.001 are one address: -t said ok, the start failed with
    "address already in use". Expected: IPv4 literals normalised (or the odd spelling
    refused) before the clash check."""
    out = _errors("services:\n  - {name: a, type: static, listeners: ['127.0.0.1:20011']}\n"
                  "  - {name: b, type: static, listeners: ['127.000.000.001:20011']}\n")
    assert "c.yaml:3: services[1].listeners[0]:" in out, out


def test_a_backend_host_that_is_no_address_is_refused() -> None:
    """A backend ``[zzz]:80`` passed -t (every request to it then fails)."""
    out = _errors(_proxy("", "      - {name: u, backends: [{addr: '[zzz]:80'}]}\n"))
    assert "c.yaml:6: services[0].upstreams[0].backends[0].addr:" in out, out


def test_a_unix_socket_path_too_long_for_sun_path_is_refused(tmp_path) -> None:
    """AF_UNIX paths are limited to 107 bytes. A longer listener passed -t and the start
    failed ("AF_UNIX path too long"); a longer upgrade_sock passed -t and every upgrade
    failed. Expected: -t refuses both, naming the key."""
    long = "/tmp/" + "a" * 120 + ".sock"
    ko, conf = _dash_t(tmp_path, f"upgrade_sock: {long}\nservices:\n"
                                 f"  - {{name: s, type: static, listeners: ['unix:{long}']}}\n")
    assert ko.returncode == 1, ko.stdout + ko.stderr
    assert f"{conf}:1: upgrade_sock:" in ko.stderr, ko.stderr
    assert f"{conf}:3: services[0].listeners[0]:" in ko.stderr, ko.stderr


def test_a_unix_listener_in_a_missing_directory_is_refused(tmp_path) -> None:
    """As error_log's directory: -t said ok, the start failed ("No such file or
    directory", without file or line)."""
    ko, conf = _dash_t(tmp_path, "services:\n  - {name: s, type: static, listeners: "
                                 f"['unix:{tmp_path}/none/s.sock']}}\n")
    assert ko.returncode == 1 and f"{conf}:2: services[0].listeners[0]" in ko.stderr, ko.stderr


def test_a_background_service_has_no_listeners() -> None:
    """A background service's ``listeners`` were silently ignored (nothing bound them).
    Expected: refused, as ``mode`` on a TCP listener is."""
    out = _errors("services:\n  - {name: bg, type: background, app: 'json:JSONDecoder',"
                  " listeners: ['127.0.0.1:0']}\n")
    assert "c.yaml:2: services[0].listeners:" in out, out


def test_tls_issues_name_the_key_path_of_alpn_and_sni(tmp_path) -> None:
    """cli.build_services strips "tls" from check_tls's messages, which left "tls: .alpn:
    unknown protocol 'h3'" and "tls: .sni[0] (b): ...". Expected: ``tls.alpn: ...``. And a
    certificate path that is a directory was said not to exist."""
    ko, conf = _dash_t(tmp_path, "services:\n  - name: s\n    type: static\n    listeners:\n"
                                 "      - address: '127.0.0.1:0'\n"
                                 f"        tls: {{cert: {tmp_path}, key: {tmp_path}/k.pem,"
                                 " alpn: [h3]}\n")
    assert ko.returncode == 1
    assert "tls: .alpn" not in ko.stderr and "services[0].listeners[0].tls.alpn: unknown " \
        "protocol 'h3'" in ko.stderr, ko.stderr
    assert f"{tmp_path} does not exist" not in ko.stderr, ko.stderr


# --------------------------------------------------------------------- upstreams and routes

def test_two_upstream_groups_with_one_name_are_refused() -> None:
    """The second ``u`` silently replaced the first (a dict by name in DeclarativeProxy):
    every request went to 127.0.0.1:2. Expected: "duplicate upstream group name 'u'"."""
    out = _errors(_proxy("    routes: [{path_prefix: /, upstream: u}]\n",
                         "      - {name: u, backends: [{addr: '127.0.0.1:1'}]}\n"
                         "      - {name: u, backends: [{addr: '127.0.0.1:2'}]}\n"))
    assert "c.yaml:7: services[0].upstreams[1].name:" in out, out


@pytest.mark.parametrize("route,key", [
    ("{path_prefix: api, upstream: u}", "path_prefix"),
    ("{host: 'example.com:8080', upstream: u}", "host"),
])
def test_a_route_that_can_never_match_is_refused(route: str, key: str) -> None:
    """A request path always starts with '/', and the Host is matched without its port:
    these routes passed -t and matched nothing (404 for every request). Expected: refused
    with file, line and key."""
    out = _errors(_proxy(f"    routes:\n      - {route}\n"))
    assert f"c.yaml:8: services[0].routes[0].{key}:" in out, out


def test_a_health_check_path_and_a_dns_port_are_checked_where_they_are_written(tmp_path
                                                                               ) -> None:
    """Both were found only when building the service, and reported at the service (line
    2, ``services[0]``): "health check path must start with '/'", and for ``port: 70000``
    "dns discovery of 'a.test' (A) needs a port" (it has one; it is out of range).
    Expected: each at its own line and key."""
    ko, conf = _dash_t(tmp_path, _proxy(
        "", "      - name: u\n        backends: [{addr: '127.0.0.1:1'}]\n"
            "        health_check:\n          type: http\n          path: healthz\n"
            "      - name: d\n        discovery:\n          type: dns\n"
            "          name: a.test\n          port: 70000\n    upstream: u\n"))
    assert ko.returncode == 1
    assert f"{conf}:10: services[0].upstreams[0].health_check.path:" in ko.stderr, ko.stderr
    assert f"{conf}:15: services[0].upstreams[1].discovery.port:" in ko.stderr, ko.stderr


@pytest.mark.parametrize("service,key", [
    # static headers: a CR/LF failed every worker's boot (exit 3, every service down)
    ("{name: s, type: static, listeners: ['127.0.0.1:0'], headers: {x-a: \"a\\r\\nb: c\"}}",
     "services[0].headers.x-a"),
    # a header name with a space was sent as is: an invalid response
    ("{name: s, type: static, listeners: ['127.0.0.1:0'], headers: {'bad name': x}}",
     "services[0].headers.bad name"),
    # a value left empty was sent as the text None
    ("{name: s, type: static, listeners: ['127.0.0.1:0'], headers: {x-a: }}",
     "services[0].headers.x-a"),
    # proxy edits: every response got 500 (ValueError in the worker)
    ("{name: p, type: http_proxy, listeners: ['127.0.0.1:0'], upstreams: [{name: u, backends:"
     " [{addr: '127.0.0.1:1'}]}], response_headers: {set: {x-a: \"a\\r\\nb: c\"}}}",
     "services[0].response_headers.set.x-a"),
    ("{name: p, type: http_proxy, listeners: ['127.0.0.1:0'], upstreams: [{name: u, backends:"
     " [{addr: '127.0.0.1:1'}]}], request_headers: {set: {'x a': v}}}",
     "services[0].request_headers.set.x a"),
    # health checks: "GET /a b HTTP/1.1" is refused by every origin: all backends unhealthy
    ("{name: p, type: http_proxy, listeners: ['127.0.0.1:0'], upstreams: [{name: u, backends:"
     " [{addr: '127.0.0.1:1'}], health_check: {type: http, path: '/a b'}}]}",
     "services[0].upstreams[0].health_check.path"),
    ("{name: p, type: http_proxy, listeners: ['127.0.0.1:0'], upstreams: [{name: u, backends:"
     " [{addr: '127.0.0.1:1'}], health_check: {type: http, host: \"a\\r\\nx: y\"}}]}",
     "services[0].upstreams[0].health_check.host"),
])
def test_header_names_and_values_that_http_cannot_carry_are_refused(service: str, key: str
                                                                    ) -> None:
    """Header names must be tokens and values free of CR, LF and NUL (and a value must be
    given); a health check's path and Host go on its request line and in a header. All of
    these passed -t. Expected: refused with file, line and key."""
    out = _errors(f"services:\n  - {service}\n")
    assert f"c.yaml:2: {key}:" in out, out


def test_a_prometheus_path_must_start_with_a_slash() -> None:
    """``path: metrics`` passed -t and every scrape got 404. Expected: refused like a
    health check path."""
    out = _errors("services:\n  - {name: m, type: prometheus, listeners: ['127.0.0.1:0'],"
                  " path: metrics}\n")
    assert "c.yaml:2: services[0].path:" in out, out


# --------------------------------------------------------------------- services

def test_a_background_app_that_is_no_background_service_is_refused(tmp_path) -> None:
    """``app: "os:path"`` (a module, no ``start``) passed -t; every start of its worker
    raised AttributeError and after five the master stopped with exit 3 (tracebacks in
    the log). A ProxyHttp app is checked ("did not give a ProxyHttp"); expected the same
    for a background app: it must have start or start_with_ready_notifier."""
    ko, conf = _dash_t(tmp_path, "services:\n  - name: bg\n    type: background\n"
                                 "    app: 'os:path'\n")
    assert ko.returncode == 1, ko.stdout + ko.stderr
    assert "Traceback" not in ko.stderr and "os:path" in ko.stderr, ko.stderr


def test_an_app_import_error_names_the_app_line_and_key(tmp_path) -> None:
    """Build errors were reported at ``services[i]`` and the service's first line; the
    line and key of ``app`` are known. (test_config.py's -t test, a flow mapping on one
    line, asserts the ``services[2]`` key: update it with the fix.)"""
    ko, conf = _dash_t(tmp_path, "services:\n  - name: bg\n    type: background\n\n"
                                 "    app: 'no_such_module_here:App'\n")
    assert f"{conf}:5: services[0].app: " in ko.stderr, ko.stderr


@pytest.mark.parametrize("name", ["n" * 300, "a\x00b", "a\nb"])
def test_a_service_name_is_a_short_plain_name(name: str) -> None:
    """The name goes into file names (a proxy's health table), socket keys and process
    titles. 300 characters passed -t, and the prober of a proxy with health checks
    crash-looped on "File name too long" (exit 3); NUL and newlines were accepted too.
    Expected: a bounded length and no control characters."""
    out = _errors(f"services:\n  - {{name: {json.dumps(name)}, type: static,"
                  " listeners: ['127.0.0.1:0']}\n")
    assert "c.yaml:2: services[0].name:" in out, out


# --------------------------------------------------------------------- what -t checks here

def test_dash_t_refuses_an_endless_configuration_within_its_bound() -> None:
    """``-c /dev/zero`` read until memory ran out (the process hung, growing): the file is
    read to 16 MiB and one byte, and anything longer is refused as not a configuration."""
    ko = subprocess.run([sys.executable, "-m", "pyngora", "-t", "-c", "/dev/zero"],
                        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert ko.returncode == 1, ko.stdout + ko.stderr
    assert "/dev/zero" in ko.stderr and "larger than 16 MiB" in ko.stderr, ko.stderr
    assert "Traceback" not in ko.stderr, ko.stderr


def test_a_configuration_from_a_pipe_still_loads(tmp_path) -> None:
    """The bound reads a pipe (``-c <(...)``) as before: a short one is a configuration."""
    r, w = os.pipe()
    os.write(w, STATIC.encode())
    os.close(w)
    try:
        ok = subprocess.run([sys.executable, "-m", "pyngora", "-t", "-c", f"/dev/fd/{r}"],
                            capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL, pass_fds=(r,))
    finally:
        os.close(r)
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_error_log_stderr_means_stderr_not_a_file_named_stderr(tmp_path) -> None:
    """nginx's ``error_log stderr``: pyngora took ``stderr`` for a relative path and made a
    file of that name beside the configuration. It is the default (stderr) now."""
    conf = parse_text("error_log: stderr\n" + STATIC, str(tmp_path / "c.yaml"))
    assert conf.error_log is None
    named = parse_text("error_log: logs/stderr\n" + STATIC, str(tmp_path / "c.yaml"))
    assert named.error_log == str(tmp_path / "logs" / "stderr")  # a path that says so is one


def test_dash_t_refuses_log_files_that_are_directories(tmp_path) -> None:
    """-t checks that the log files' directories exist, not that the paths are not
    directories: ``error_log: /some/dir`` passed, then the start died with a traceback
    (IsADirectoryError in log.setup); ``access_log`` so crash-looped every worker (exit 3).
    """
    ko, conf = _dash_t(tmp_path, f"error_log: {tmp_path}\naccess_log: {tmp_path}\n" + STATIC)
    assert ko.returncode == 1, ko.stdout + ko.stderr
    assert f"{conf}:1: error_log:" in ko.stderr and f"{conf}:2: access_log:" in ko.stderr, \
        ko.stderr


@pytest.mark.parametrize("value", ["''", "{tmp}"])
def test_dash_t_refuses_a_pid_file_that_cannot_be_written(tmp_path, value: str) -> None:
    """A pid_file that is empty or a directory passed -t; the start then failed ("cannot
    write pid_file"), with no file or line. (One in a directory that does not exist yet
    passes: systemd's RuntimeDirectory makes /run/pyngora when the service starts.)"""
    ko, conf = _dash_t(tmp_path, f"pid_file: {value.format(tmp=tmp_path)}\n" + STATIC)
    assert ko.returncode == 1 and f"{conf}:1: pid_file:" in ko.stderr, ko.stdout + ko.stderr


def test_dash_t_refuses_a_pid_file_that_is_the_configuration_itself(tmp_path) -> None:
    """``pid_file`` naming the configuration file passed -t; the start replaced the file
    with the pid, and a clean stop removed it: the configuration was lost. Expected: -t
    refuses pid_file (and error_log, access_log) naming the configuration file (or a file
    it reads: certificates, keys, ca_file)."""
    conf = tmp_path / "c.yaml"
    ko, _ = _dash_t(tmp_path, f"pid_file: {conf}\n" + STATIC)
    assert ko.returncode == 1 and f"{conf}:1: pid_file:" in ko.stderr, ko.stdout + ko.stderr


def test_dash_t_refuses_a_ca_file_that_does_not_load(tmp_path) -> None:
    """``ca_file`` missing passed -t; every request to a TLS backend got 500
    (FileNotFoundError). Expected: checked like a listener's certificate."""
    ko, conf = _dash_t(tmp_path, f"ca_file: {tmp_path}/none.pem\n" + _proxy(
        "", "      - {name: u, backends: [{addr: '127.0.0.1:1', tls: true}]}\n"))
    assert ko.returncode == 1 and f"{conf}:1: ca_file:" in ko.stderr, ko.stdout + ko.stderr


def test_dash_t_refuses_a_metrics_dir_that_cannot_be_one(tmp_path) -> None:
    """``metrics_dir`` naming a file passed -t; the master logged "unusable" and the
    prometheus service answered 503 to every scrape."""
    f = tmp_path / "a-file"
    f.write_text("x")
    ko, conf = _dash_t(tmp_path, f"metrics_dir: {f}\nservices:\n"
                                 "  - {name: m, type: prometheus, listeners: ['127.0.0.1:0']}\n")
    assert ko.returncode == 1 and f"{conf}:1: metrics_dir:" in ko.stderr, ko.stdout + ko.stderr


def test_an_empty_tls_or_h2c_beside_tls_is_refused() -> None:
    """``tls:`` left empty (YAML null) served plaintext without a word, where the operator
    asked for TLS; ``h2c: true`` beside ``tls`` was accepted though a TLS listener offers
    HTTP/2 by ALPN only. Expected: both refused at their key."""
    out = _errors("services:\n  - name: s\n    type: static\n    listeners:\n"
                  "      - address: '127.0.0.1:0'\n        tls:\n")
    assert "c.yaml:6: services[0].listeners[0].tls: needs cert and key" in out, out
    out = _errors("services:\n  - name: s\n    type: static\n    listeners:\n"
                  "      - address: '127.0.0.1:0'\n        tls: {cert: a.pem, key: b.pem}\n"
                  "        h2c: true\n")
    assert "c.yaml:7: services[0].listeners[0].h2c: h2c is HTTP/2 in plaintext" in out, out


def test_route_hosts_the_review_found_refused_or_lost() -> None:
    """After the first round: ``host: ""`` (a templated value) meant "any host" and must
    still; ``host: "*"`` matched only a literal ``Host: *``, and ``münchen.de`` nothing
    (request Hosts are ASCII): refused, saying what to write instead. IDN listener and
    backend names (getaddrinfo looks their punycode up) load as before."""
    conf = parse_text(_proxy("    routes: [{host: '', upstream: u}]\n"), "c.yaml")
    assert conf.services[0].spec.routes[0].host == ""
    out = _errors(_proxy("    routes:\n      - {host: '*', upstream: u}\n"))
    assert "c.yaml:8: services[0].routes[0].host: '*' matches only" in out, out
    out = _errors(_proxy("    routes:\n      - {host: 'münchen.de', upstream: u}\n"))
    assert "punycode form ('xn--mnchen-3ya.de')" in out, out
    parse_text(_proxy("", "      - {name: v, backends: [{addr: 'bücher.example:80'}]}\n"),
               "c.yaml")
