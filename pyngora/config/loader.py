"""YAML file -> ServerConf, with the line of every key so errors name file, line and key."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional

import yaml

from pyngora.config.schema import (ConfigError, ConfigIssue, Path, ServerConf, ServiceConf,
                                   build_server_conf)


# Nodes an alias may make the plain data visit: a file of real configuration stays far below;
# "billion laughs" (aliases of aliases) would otherwise expand without bound, in the master.
MAX_NODES = 1_000_000
_MERGE = "tag:yaml.org,2002:merge"


class _Plain:
    """Compose-tree -> plain data, recording the 1-based line of each key and item, and
    collecting what cannot be read (duplicate keys, keys that are not scalars, values no
    constructor takes) as issues instead of stopping at the first."""

    def __init__(self) -> None:
        self.lines: dict[Path, int] = {}
        self.issues: list[ConfigIssue] = []
        self.nodes = 0

    def node(self, node: yaml.Node, path: Path) -> Any:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise ConfigError("", [ConfigIssue(path, f"more than {MAX_NODES} values once its "
                                               "aliases are expanded (an alias bomb?)",
                                               node.start_mark.line + 1)])
        self.lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            return self.mapping(node, path)
        if isinstance(node, yaml.SequenceNode):
            return [self.node(v, path + (i,)) for i, v in enumerate(node.value)]
        return self.scalar(node, path)

    def mapping(self, node: yaml.MappingNode, path: Path) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        merged: list[tuple[dict[Any, Any], int]] = []
        for knode, vnode in node.value:
            line = knode.start_mark.line + 1
            if knode.tag == _MERGE:  # "<<: *defaults": explicit keys win, whatever the order
                for m in (vnode.value if isinstance(vnode, yaml.SequenceNode) else [vnode]):
                    value = self.node(m, path)
                    if isinstance(value, dict):
                        merged.append((value, line))
                    else:
                        self.issues.append(ConfigIssue(path, "<< must merge a mapping", line))
                continue
            if not isinstance(knode, yaml.ScalarNode):
                self.issues.append(ConfigIssue(path, "a key must be a plain name", line))
                continue
            key = self.scalar(knode, path)
            if key is None or isinstance(key, (list, dict)):
                self.issues.append(ConfigIssue(path, f"a key must be a plain name, got "
                                               f"{knode.value!r}", line))
                continue
            kpath = path + (key,)
            if key in out:
                self.issues.append(ConfigIssue(kpath, "duplicate key", line))
                continue
            out[key] = self.node(vnode, kpath)
            self.lines[kpath] = line
        for value, line in merged:
            for k, v in value.items():
                if k not in out:
                    out[k] = v
                    self.lines.setdefault(path + (k,), line)
        return out

    def scalar(self, node: yaml.Node, path: Path) -> Any:
        try:
            return _constructor.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, TypeError) as e:
            problem = getattr(e, "problem", None) or str(e)
            self.issues.append(ConfigIssue(path, f"cannot read {node.value!r}: {problem}",
                                           node.start_mark.line + 1))
            return None


_constructor = yaml.SafeLoader("")


def parse_text(text: str, source: str) -> ServerConf:
    """Parse YAML text into a ServerConf; ConfigError names ``source:line: key: message``."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise ConfigError(source, [ConfigIssue((), f"invalid YAML: {getattr(e, 'problem', e)}",
                                               line)]) from None
    plain = _Plain()
    try:
        raw = plain.node(node, ()) if node is not None else {}
    except ConfigError as e:
        raise ConfigError(source, plain.issues + e.issues) from None
    lines = plain.lines

    def where(path: Path) -> Optional[int]:
        while path:
            if path in lines:
                return lines[path]
            path = path[:-1]
        return lines.get(())
    base = os.path.dirname(os.path.abspath(source))
    try:
        conf = build_server_conf(raw, source, where)
    except ConfigError as e:
        seen = {i.path for i in plain.issues}  # (a value already said unreadable: once)
        partial = None if e.partial is None else (_absolute_paths(e.partial[0], base),
                                                  e.partial[1])
        raise ConfigError(source, plain.issues + [i for i in e.issues if i.path not in seen],
                          partial) from None
    conf = _absolute_paths(conf, base)
    if plain.issues:
        raise ConfigError(source, plain.issues, (conf, tuple(range(len(conf.services)))))
    return conf


# Paths the server opens itself; relative ones are taken from the configuration file's
# directory, so that -d (which changes to /) and -s (run from anywhere) agree on them; so are
# the listeners' TLS certificates and keys. (access_log must be absolute: see the schema.)
_PATH_KEYS = ("pid_file", "upgrade_sock", "error_log", "metrics_dir", "working_directory",
              "ca_file")


def _absolute_paths(conf: ServerConf, base: str) -> ServerConf:
    def absolute(v: Any) -> Any:
        return os.path.join(base, v) if isinstance(v, str) and v and not os.path.isabs(v) else v

    changes: dict[str, Any] = {k: absolute(v) for k in _PATH_KEYS
                               if (v := getattr(conf, k)) != absolute(v)}
    services = tuple(_tls_paths(sc, absolute) for sc in conf.services)
    if services != conf.services:
        changes["services"] = services
    return dataclasses.replace(conf, **changes) if changes else conf


def _tls_paths(sc: ServiceConf, absolute: Callable[[Any], Any]) -> ServiceConf:
    """``sc`` with its listeners' certificate and key paths made absolute by ``absolute``."""
    listeners = tuple(
        dataclasses.replace(lc, tls=dataclasses.replace(
            lc.tls, cert=absolute(lc.tls.cert), key=absolute(lc.tls.key),
            sni=tuple(dataclasses.replace(s, cert=absolute(s.cert), key=absolute(s.key))
                      for s in lc.tls.sni)))
        if lc.tls is not None else lc
        for lc in sc.listeners)
    return dataclasses.replace(sc, listeners=listeners) if listeners != sc.listeners else sc


def load(path: str) -> ServerConf:
    """Read and validate a configuration file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(path, [ConfigIssue((), f"cannot read: {e.strerror}")]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(path, [ConfigIssue((), f"not UTF-8 text (byte {data[e.start]:#04x})",
                                             line)]) from None
    return parse_text(text, path)
