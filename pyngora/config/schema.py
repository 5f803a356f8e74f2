"""The configuration schema: plain YAML data checked against the model's frozen dataclasses.

No I/O here. `build_server_conf(raw, where)` turns plain YAML data into a `ServerConf`,
collecting every problem as a `ConfigIssue` (key path + message); `where(path)` gives the line
of a key, so the loader can name file, line and key in each error. The dataclasses themselves
(Pingora's key names and defaults) are in ``model.py``; every name of it is re-exported here,
which is where the rest of pyngora imports them from.
"""
from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import re
import typing
from typing import Any, Callable, Optional, Union

from pyngora.config import fields
# Re-exported: the dataclasses lived here before they got their own module.
from pyngora.config.model import (SERVICE_SPECS, BackendConf, BackgroundConf, DiscoveryConf,
                                  HeaderEdits, HealthCheckConf, HttpProxyConf, LimitsConf,
                                  ListenerConf, Path, PrometheusConf, RouteConf, ServerConf,
                                  ServiceConf, SniCert, StaticConf, TimeoutsConf, TlsConf,
                                  UpstreamConf, check_host, parse_address)

__all__ = ["ConfigIssue", "ConfigError", "Where", "build_server_conf", "Path", "SniCert",
           "TlsConf", "ListenerConf", "parse_address", "HeaderEdits", "LimitsConf",
           "TimeoutsConf", "HealthCheckConf", "DiscoveryConf", "BackendConf", "UpstreamConf",
           "RouteConf", "HttpProxyConf", "StaticConf", "PrometheusConf", "BackgroundConf",
           "SERVICE_SPECS", "ServiceConf", "ServerConf"]


class ConfigIssue:
    """One problem in a configuration: where it is and what is wrong."""

    __slots__ = ("path", "message", "line")

    def __init__(self, path: Path, message: str, line: Optional[int] = None) -> None:
        self.path = path
        self.message = message
        self.line = line

    @property
    def key(self) -> str:
        out = ""
        for p in self.path:
            out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
        return out or "(top level)"


class ConfigError(Exception):
    """Every issue of one configuration file; ``str()`` lists them as ``file:line: key: message``."""

    def __init__(self, source: str, issues: list[ConfigIssue],
                 partial: Optional[tuple["ServerConf", tuple[int, ...]]] = None) -> None:
        self.source = source
        self.issues = issues
        # What could be built despite the issues: the ServerConf and, for each of its
        # services, its index in the file's list (so ``-t`` can check those services too).
        self.partial = partial
        super().__init__(self.render())

    def render(self) -> str:
        lines = []
        for i in self.issues:
            loc = f"{self.source}:{i.line}" if i.line else self.source
            lines.append(f"{loc}: {i.key}: {i.message}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- the builder
Where = Callable[[Path], Optional[int]]

# A float written with an exponent but no dot (1e3): YAML 1.1 reads it as a string.
_EXPONENT = re.compile(r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)[eE][-+]?[0-9]+")
# Any number of seconds: more than any timeout needs, and far below what time_t and
# socket.settimeout take (10**10 s overflows them).
MAX_SECONDS = 365 * 24 * 3600
# Worker processes per service, as nginx's NGX_MAX_PROCESSES: past that the master forks
# (or, pinned, binds sockets) until the machine runs out.
MAX_THREADS = 1024


class _Builder:
    """Walks plain YAML data against the dataclasses of ``model.py``, collecting issues."""

    def __init__(self, where: Where) -> None:
        self.where = where
        self.issues: list[ConfigIssue] = []
        self.service_index: list[int] = []  # each built service's index in the file's list

    def fail(self, path: Path, message: str) -> None:
        self.issues.append(ConfigIssue(path, message, self.where(path)))

    def dataclass(self, cls: type, raw: Any, path: Path, skip: tuple[str, ...] = ()) -> Any:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            self.fail(path, f"expected a mapping, got {type(raw).__name__}")
            return None
        hints = typing.get_type_hints(cls)
        flds = {f.name: f for f in dataclasses.fields(cls)
                if f.name not in ("source", "extra", "where")}
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in raw.items():
            kpath = path + (key,)
            if not isinstance(key, str):
                self.fail(kpath, "keys must be strings")
                continue
            if key.startswith("x-"):
                extra[key] = value
                continue
            if key in skip:
                continue
            f = flds.get(key)
            if f is None:
                near = difflib.get_close_matches(key, list(flds) + list(skip), n=1, cutoff=0.6)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                self.fail(kpath, f"unknown key{hint}")
                continue
            ok, val = self.value(hints[key], value, kpath, f.metadata)
            if ok:
                kwargs[key] = val
        for name, f in flds.items():
            if name not in kwargs and f.default is dataclasses.MISSING \
                    and f.default_factory is dataclasses.MISSING and name not in raw:
                self.fail(path + (name,), "required key is missing")
                return None
        if "extra" in {f.name for f in dataclasses.fields(cls)}:
            kwargs["extra"] = extra
        try:
            return cls(**kwargs)
        except TypeError as e:  # a required key failed validation above
            if not self.issues:
                self.fail(path, str(e))
            return None

    def value(self, tp: Any, raw: Any, path: Path, meta: Any = None) -> tuple[bool, Any]:
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if origin is Union:
            if raw is None and type(None) in args:
                return True, None
            inner = [a for a in args if a is not type(None)]
            return self.value(inner[0], raw, path, meta)
        if dataclasses.is_dataclass(tp):
            built = self.dataclass(tp, raw, path)
            return built is not None, built
        if origin is tuple:
            elem = args[0]
            if typing.get_origin(elem) is tuple:  # header fields: a mapping in YAML
                return self.header_fields(raw, path)
            if not isinstance(raw, list):
                self.fail(path, f"expected a list, got {type(raw).__name__}")
                return False, None
            out = []
            ok_all = True
            for i, item in enumerate(raw):
                ok, v = self.value(elem, item, path + (i,))
                ok_all &= ok
                out.append(v)
            return ok_all, tuple(out)
        choices = meta.get("choices") if meta else None
        if tp is bool:
            if not isinstance(raw, bool):
                self.fail(path, f"expected true or false, got {raw!r}")
                return False, None
            return True, raw
        if tp is int:
            if isinstance(raw, bool) or not isinstance(raw, int):
                self.fail(path, f"expected an integer, got {raw!r}")
                return False, None
            if raw < 0:
                self.fail(path, f"must not be negative, got {raw}")
                return False, None
            return self.bounded(raw, path, meta)
        if tp is float:
            if isinstance(raw, str) and _EXPONENT.fullmatch(raw):
                raw = float(raw)  # YAML 1.1 reads 1e3 as a string; YAML 1.2 and JSON: 1000
            if isinstance(raw, bool) or not isinstance(raw, (int, float)):
                self.fail(path, f"expected a number of seconds, got {raw!r}")
                return False, None
            if isinstance(raw, float) and not math.isfinite(raw):  # (an int is finite)
                self.fail(path, f"expected a finite number of seconds, got {raw!r}")
                return False, None
            if raw < 0:
                self.fail(path, f"must not be negative, got {raw}")
                return False, None
            if raw > MAX_SECONDS:
                self.fail(path, f"must be at most {MAX_SECONDS} (a year), got {raw}")
                return False, None
            return self.bounded(float(raw), path, meta)
        if tp is str:
            if not isinstance(raw, (str, int, float)) or isinstance(raw, bool):
                self.fail(path, f"expected a string, got {raw!r}")
                return False, None
            raw = str(raw)
            if choices and raw not in choices:
                self.fail(path, f"must be one of {', '.join(choices)}; got {raw!r}")
                return False, None
            return True, raw
        if tp is dict or origin is dict:
            return True, raw
        self.fail(path, f"unsupported value {raw!r}")
        return False, None

    def bounded(self, value: Any, path: Path, meta: Any) -> tuple[bool, Any]:
        """The bounds a field's metadata sets (model.py): ``above`` (exclusive), ``range``
        (inclusive, None for no upper bound) and ``at_most``."""
        if meta:
            above = meta.get("above")
            if above is not None and not value > above:
                self.fail(path, f"must be more than {above}, got {value}")
                return False, None
            bounds = meta.get("range")
            if bounds is not None:
                lo, hi = bounds
                if value < lo or (hi is not None and value > hi):
                    want = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
                    self.fail(path, f"must be {want}, got {value}")
                    return False, None
            cap = meta.get("at_most")
            if cap is not None and value > cap:
                self.fail(path, f"must be at most {cap}, got {value}")
                return False, None
        return True, value

    def header_fields(self, raw: Any, path: Path) -> tuple[bool, Any]:
        """A mapping of header name: value -> ((name, value), ...), each one HTTP can carry."""
        if not isinstance(raw, dict):
            self.fail(path, "expected a mapping of name: value")
            return False, None
        ok = True
        for name, value in raw.items():
            problem = fields.header_name(str(name)) or fields.header_value(value)
            if problem is not None:
                self.fail(path + (name,), problem)
                ok = False
        return ok, tuple((str(k), str(v)) for k, v in raw.items()) if ok else None

    def threads(self, raw: Any, path: Path) -> Optional[int]:
        """``threads``: a number of worker processes, or auto (the CPU count)."""
        if raw == "auto":
            return os.cpu_count() or 1
        if isinstance(raw, bool) or not isinstance(raw, int):
            self.fail(path, f"expected an integer, got {raw!r} (or auto: the CPU count)")
        elif not 1 <= raw <= MAX_THREADS:
            self.fail(path, f"must be between 1 and {MAX_THREADS} (or auto), got {raw}")
        else:
            return raw
        return None

    # ---- the parts with their own shape
    def server(self, raw: Any, source: str) -> Optional[ServerConf]:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            self.fail((), "the configuration must be a mapping of keys")
            return None
        body = dict(raw)
        body.pop("services", None)
        if "threads" in body:
            threads = self.threads(body.pop("threads"), ("threads",))
            if threads is not None:
                body["threads"] = threads
        if raw.get("access_log") is False:  # YAML 1.1 reads an unquoted off as false
            body["access_log"] = "off"
        if raw.get("error_log") == "stderr":  # nginx's spelling of the default, not a file name
            body["error_log"] = None
        conf = self.dataclass(ServerConf, body, (), skip=("services",))
        if conf is not None and conf.version != 1:
            self.fail(("version",), f"unsupported version {conf.version} (this pyngora reads 1)")
        if conf is not None and conf.access_log not in ("off", "stdout") \
                and not conf.access_log.startswith("/"):
            self.fail(("access_log",), "must be off, stdout or an absolute path")
        services = self.services(raw.get("services"), ("services",))
        if conf is None:
            return None
        return dataclasses.replace(conf, services=tuple(services), source=source,
                                   where=self.where)

    def services(self, raw: Any, path: Path) -> list[ServiceConf]:
        if raw is None:
            return []
        if not isinstance(raw, list):
            self.fail(path, "expected a list of services")
            return []
        out: list[ServiceConf] = []
        names: set[str] = set()
        taken: dict[tuple[str, str, Any], str] = {}  # what binds where -> its service
        for i, item in enumerate(raw):
            svc = self.service(item, path + (i,))
            if svc is None:
                continue
            if svc.name in names:
                self.fail(path + (i, "name"), f"duplicate service name {svc.name!r}")
            names.add(svc.name)
            for j, listener in enumerate(svc.listeners):
                other = _clash(listener, taken)
                if other is not None:
                    self.fail(path + (i, "listeners", j),
                              f"{listener.address} is already a listener of service {other!r}"
                              " (the master would fail to bind it)")
                taken[_bind_key(listener)] = svc.name
            out.append(svc)
            self.service_index.append(i)
        return out

    def service(self, raw: Any, path: Path) -> Optional[ServiceConf]:
        if not isinstance(raw, dict):
            self.fail(path, "expected a mapping")
            return None
        common = ("name", "type", "listeners", "threads", "work_stealing")
        name = raw.get("name")
        stype = raw.get("type")
        if not isinstance(name, str):
            self.fail(path + ("name",), "required: a service name without '/'")
            return None
        problem = fields.service_name(name)
        if problem is not None:
            self.fail(path + ("name",), problem)
            return None
        if stype not in SERVICE_SPECS:
            near = difflib.get_close_matches(str(stype), list(SERVICE_SPECS), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            self.fail(path + ("type",), f"must be one of {', '.join(SERVICE_SPECS)}{hint}")
            return None
        threads = raw.get("threads")
        if threads is not None:
            threads = self.threads(threads, path + ("threads",))
        ws = raw.get("work_stealing")
        if ws is not None and not isinstance(ws, bool):
            self.fail(path + ("work_stealing",), "expected true or false")
            ws = None
        listeners = self.listeners(raw.get("listeners"), path + ("listeners",), stype)
        spec = self.dataclass(SERVICE_SPECS[stype], raw, path, skip=common)
        if spec is None:
            return None
        if isinstance(spec, HttpProxyConf):
            self.check_proxy(spec, path)
        if isinstance(spec, PrometheusConf):
            problem = fields.request_path(spec.path)
            if problem is not None:
                self.fail(path + ("path",), problem)
        return ServiceConf(name=name, type=stype, listeners=tuple(listeners), threads=threads,
                           work_stealing=ws, spec=spec)

    def listeners(self, raw: Any, path: Path, stype: str) -> list[ListenerConf]:
        if stype == "background":
            if raw not in (None, []):  # nothing would bind them
                self.fail(path, "a background service has no listeners")
            return []
        if raw is None or raw == []:
            self.fail(path, f"a {stype} service needs at least one listener")
            return []
        if not isinstance(raw, list):
            self.fail(path, "expected a list of listeners")
            return []
        out = []
        for i, item in enumerate(raw):
            lpath = path + (i,)
            if isinstance(item, str):
                item = {"address": item}
            if not isinstance(item, dict):
                self.fail(lpath, "expected an address or a mapping with address")
                continue
            allowed = ("address", "mode", "backlog", "tls", "h2c")
            bad = [k for k in item if k not in allowed and not str(k).startswith("x-")]
            for k in bad:
                near = difflib.get_close_matches(str(k), allowed, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                self.fail(lpath + (k,), f"unknown key{hint}")
            mode = item.get("mode")
            if mode is not None:
                # a quoted octal string only: YAML reads 0660 as 432 and 660 as six hundred
                # sixty, and either would silently give the socket the wrong permissions
                bad_mode = f"expected a quoted octal mode like '0660', got {mode!r}"
                try:
                    mode = int(mode, 8) if isinstance(mode, str) else -1
                except ValueError:
                    mode = -1
                if not 0 <= mode <= 0o777:
                    self.fail(lpath + ("mode",), bad_mode)
                    mode = None
                elif not str(item.get("address", "")).startswith("unix:"):
                    self.fail(lpath + ("mode",), "mode applies to unix: listeners only")
                    mode = None
            backlog = item.get("backlog", 1024)
            if not isinstance(backlog, int) or isinstance(backlog, bool) or not 1 <= backlog <= 65535:
                self.fail(lpath + ("backlog",), f"must be an integer from 1 to 65535, got {backlog!r}")
                backlog = 1024
            tls = None
            if "tls" in item and item["tls"] is None:
                # "tls:" left empty: serving plaintext where TLS was asked would be silent
                self.fail(lpath + ("tls",), "needs cert and key (remove it for plaintext)")
            elif item.get("tls") is not None:
                ok, tls = self.value(Optional[TlsConf], item["tls"], lpath + ("tls",))
            h2c = item.get("h2c", False)
            if not isinstance(h2c, bool):
                self.fail(lpath + ("h2c",), "expected true or false")
                h2c = False
            elif h2c and item.get("tls") is not None:
                self.fail(lpath + ("h2c",), "h2c is HTTP/2 in plaintext: a tls listener "
                                            "offers HTTP/2 by ALPN")
                h2c = False
            try:
                out.append(parse_address(item.get("address"), backlog=backlog, mode=mode,
                                         tls=tls, h2c=h2c))
            except ValueError as e:
                self.fail(lpath + ("address",) if isinstance(raw[i], dict) else lpath, str(e))
        return out

    def check_proxy(self, spec: HttpProxyConf, path: Path) -> None:
        names: set[str] = set()
        for i, u in enumerate(spec.upstreams):
            upath = path + ("upstreams", i)
            if not u.name:
                self.fail(upath + ("name",), "every upstream group needs a name")
            elif u.name in names:  # routes name groups: a second one would replace the first
                self.fail(upath + ("name",), f"duplicate upstream group name {u.name!r}")
            names.add(u.name)
            self.check_upstream(u, upath)
        for i, r in enumerate(spec.routes):
            rpath = path + ("routes", i)
            if r.upstream not in names:
                self.fail(rpath + ("upstream",), f"no upstream group named {r.upstream!r}")
            for key, problem in (("host", r.host is not None and fields.route_host(r.host)),
                                 ("path_prefix", r.path_prefix is not None
                                  and fields.route_prefix(r.path_prefix))):
                if problem:  # a route that can never match: 404 for what it was meant for
                    self.fail(rpath + (key,), problem)
        if spec.upstream is not None and spec.upstream not in names:
            self.fail(path + ("upstream",), f"no upstream group named {spec.upstream!r}")
        if not spec.app and not spec.routes and spec.upstream is None and len(names) != 1:
            self.fail(path + ("routes",), "needs routes, an upstream, or exactly one upstream group")
        for which in ("request_headers", "response_headers"):
            edits = getattr(spec, which)
            for j, name in enumerate(edits.remove):
                problem = fields.header_name(name)
                if problem is not None:
                    self.fail(path + (which, "remove", j), problem)
        edits = spec.request_headers
        for kind, names_ in (("set", [n for n, _ in edits.set]), ("add", [n for n, _ in edits.add]),
                             ("remove", list(edits.remove))):
            for name in names_:
                why = _NOT_EDITABLE.get(name.lower())
                if why is not None and not (kind == "set" and name.lower() == "host"):
                    self.fail(path + ("request_headers", kind, name), why)

    def check_upstream(self, u: UpstreamConf, upath: Path) -> None:
        d = u.discovery
        if not u.backends and d.type == "static":
            self.fail(upath + ("backends",), "a static upstream needs backends")
        if d.type == "dns":
            if not d.name:
                self.fail(upath + ("discovery", "name"), "dns discovery needs a name")
            if d.record != "SRV" and not d.port:
                self.fail(upath + ("discovery", "port"), f"{d.record} records need a port "
                          "(only SRV records carry theirs)")
            if d.resolver is not None:
                problem = _resolver_problem(d.resolver)
                if problem is not None:
                    self.fail(upath + ("discovery", "resolver"), problem)
        for j, b in enumerate(u.backends):
            try:
                parse_address(b.addr)
            except ValueError as e:
                self.fail(upath + ("backends", j, "addr"), str(e))
        hc = u.health_check
        if u.h2 and hc.type == "http":
            self.fail(upath + ("health_check", "type"),
                      "http health checks speak HTTP/1.1; use tcp for an h2 upstream")
        if hc.type == "http":  # it sends "GET PATH HTTP/1.1" and "Host: HOST"
            for key, problem in (("path", fields.request_path(hc.path)),
                                 ("host", hc.host is not None and fields.header_value(hc.host))):
                if problem:
                    self.fail(upath + ("health_check", key), problem)
        hk = u.hash_key
        if hk not in ("uri", "path", "client_ip") and not hk.startswith(("header:", "cookie:")):
            self.fail(upath + ("hash_key",),
                      "must be uri, path, client_ip, header:NAME or cookie:NAME")
        elif hk.startswith(("header:", "cookie:")) and not hk[7:].strip():
            # An empty NAME hashes b"" for every request: all of them on one backend.
            kind = hk[:6]
            self.fail(upath + ("hash_key",),
                      f"{kind}:NAME needs a NAME (e.g. {kind}:x-user), got {hk!r}")


def _resolver_problem(value: str) -> Optional[str]:
    """What is wrong with a DNS ``resolver``: HOST, HOST:PORT, V6 or [V6]:PORT (as
    lb.balancer reads it; the port defaults to 53)."""
    port: Optional[str] = None
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                return f"expected [V6]:PORT, got {value!r}"
            port = rest[1:]
    elif value.count(":") == 1:
        host, _, port = value.partition(":")
    else:
        host = value  # no port, or a bare IPv6 address
    if port is not None and not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        return f"expected a port from 1 to 65535 in {value!r}"
    try:
        check_host(host)
    except ValueError as e:
        return str(e)
    return None


# Request fields a configuration may not edit: pyngora frames the request and speaks the
# connection's protocol itself (a "connection: close" it did not mean would still be
# pooled); Host may be set, never removed (HTTP/1.1 requires one).
_NOT_EDITABLE = {name: f"{name} is the connection's or the framing's, set by pyngora"
                 for name in ("connection", "keep-alive", "proxy-connection", "te", "trailer",
                              "transfer-encoding", "upgrade", "content-length")}
_NOT_EDITABLE["host"] = "an HTTP/1.1 request needs a Host (set it instead)"


_WILDCARDS = {"0.0.0.0", "::", ""}


def _bind_key(listener: ListenerConf) -> tuple[str, str, Any]:
    if listener.family == "unix":
        return ("unix", listener.path, None)
    family = "tcp6" if ":" in listener.host else "tcp4"  # v6 listeners are IPV6_V6ONLY
    try:  # one address, one key: [::0] is [::]
        host = str(ipaddress.ip_address(listener.host))
    except ValueError:
        host = listener.host.lower()  # a host name
    return (family, host, listener.port)


def _clash(listener: ListenerConf, taken: dict[tuple[str, str, Any], str]) -> Optional[str]:
    """The service already bound where ``listener`` would bind (the same address, or the
    same port with a wildcard host on either side), else None. Port 0 (any free port, in
    tests) never clashes."""
    family, host, port = _bind_key(listener)
    if family == "unix":
        return taken.get((family, host, port))
    if port == 0:
        return None
    for (f, h, p), name in taken.items():
        if f == family and p == port and (h == host or h in _WILDCARDS or host in _WILDCARDS):
            return name
    return None


def build_server_conf(raw: Any, source: str = "<config>",
                      where: Where = lambda p: None) -> ServerConf:
    """Plain data -> ServerConf; raises ConfigError listing every issue."""
    b = _Builder(where)
    conf = b.server(raw, source)
    if b.issues or conf is None:
        raise ConfigError(source, b.issues or [ConfigIssue((), "invalid configuration")],
                          None if conf is None else (conf, tuple(b.service_index)))
    return conf
