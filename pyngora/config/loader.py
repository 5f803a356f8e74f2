"""YAML file -> ServerConf, with the line of every key so errors name file, line and key."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional

import yaml

from pyngora.config.model import UNIX_PATH_MAX
from pyngora.config.schema import (ConfigError, ConfigIssue, Path, ServerConf, ServiceConf,
                                   build_server_conf)


# Nodes an alias may make the plain data visit: a file of real configuration stays far below;
# "billion laughs" (aliases of aliases) would otherwise expand without bound, in the master.
MAX_NODES = 1_000_000
# Nesting, as written and once aliases are expanded: a configuration needs about ten levels;
# both the composer and _Plain recurse, and a deeper file would end in RecursionError.
MAX_DEPTH = 64
_MERGE = "tag:yaml.org,2002:merge"
# What a collection may be: the safe loader would make a set of !!set and pairs of !!omap,
# and other tags (!!python/object/apply:...) must be refused, as they are on scalars.
_PLAIN_TAGS = {yaml.MappingNode: "tag:yaml.org,2002:map",
               yaml.SequenceNode: "tag:yaml.org,2002:seq"}


class _Loader(yaml.SafeLoader):
    """The safe loader, with a cap on nesting (its composer recurses)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(None, None,
                                                  f"nested deeper than {MAX_DEPTH} levels",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class _Plain:
    """Compose-tree -> plain data, recording the 1-based line of each key and item, and
    collecting what cannot be read (duplicate keys, keys that are not scalars, values no
    constructor takes, tagged collections, aliases that contain themselves) as issues
    instead of stopping at the first."""

    def __init__(self) -> None:
        self.lines: dict[Path, int] = {}
        self.issues: list[ConfigIssue] = []
        self.nodes = 0
        self.open: dict[int, tuple[Path, int]] = {}  # collections being visited: path, line

    def node(self, node: yaml.Node, path: Path, line: Optional[int] = None) -> Any:
        """``node``'s plain value at ``path``, written on ``line`` (its key's; default: where
        the node starts)."""
        self.nodes += 1
        line = line if line is not None else node.start_mark.line + 1
        if self.nodes > MAX_NODES or len(self.open) >= MAX_DEPTH:
            why = (f"more than {MAX_NODES} values once its aliases are expanded (an alias "
                   "bomb?)" if self.nodes > MAX_NODES
                   else f"nested deeper than {MAX_DEPTH} levels once its aliases are expanded")
            raise ConfigError("", [ConfigIssue(path, why, line)])
        self.lines[path] = line
        if not isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
            return self.scalar(node, path)
        empty: Any = {} if isinstance(node, yaml.MappingNode) else []
        if node.tag != _PLAIN_TAGS[type(node)]:
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            self.issues.append(ConfigIssue(path, f"cannot read a value tagged {tag}: only "
                                           "plain lists and mappings", line))
            return empty
        outer = self.open.get(id(node))
        if outer is not None:
            self.issues.append(ConfigIssue(outer[0], "an alias that contains itself",
                                           outer[1]))
            return empty
        self.open[id(node)] = (path, line)
        try:
            if isinstance(node, yaml.MappingNode):
                return self.mapping(node, path)
            return [self.node(v, path + (i,)) for i, v in enumerate(node.value)]
        finally:
            del self.open[id(node)]

    def mapping(self, node: yaml.MappingNode, path: Path) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        merged: list[tuple[dict[Any, Any], dict[Path, int]]] = []
        for knode, vnode in node.value:
            line = knode.start_mark.line + 1
            if knode.tag == _MERGE:  # "<<: *defaults": explicit keys win, whatever the order
                merged.append(self.merge(vnode, path, line))
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
            out[key] = self.node(vnode, kpath, line)
        own = set(out)
        depth = len(path)
        for value, lines in merged:
            for k, v in value.items():
                out.setdefault(k, v)
            # each merged key keeps the lines of where it is written (the anchor's mapping)
            for p, line in lines.items():
                if len(p) > depth and p[depth] not in own:
                    self.lines.setdefault(p, line)
        return out

    def merge(self, vnode: yaml.Node, path: Path, line: int
              ) -> tuple[dict[Any, Any], dict[Path, int]]:
        """The keys ``<<`` merges at ``path``, and their lines. They are read aside, so that
        they move neither the line of ``path`` nor those of the keys written there."""
        own_lines = self.lines
        out: dict[Any, Any] = {}
        lines: dict[Path, int] = {}
        try:
            for m in (vnode.value if isinstance(vnode, yaml.SequenceNode) else [vnode]):
                self.lines = {}
                value = self.node(m, path)
                if isinstance(value, dict):
                    for k, v in value.items():
                        out.setdefault(k, v)  # the first mapping merged wins, as YAML's
                    for p, at in self.lines.items():
                        lines.setdefault(p, at)
                else:
                    self.issues.append(ConfigIssue(path, "<< must merge a mapping", line))
        finally:
            self.lines = own_lines
        return out, lines

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
        node = yaml.compose(text, Loader=_Loader)
    except yaml.reader.ReaderError as e:  # a position in the text, and no problem_mark
        line = text.count("\n", 0, e.position) + 1
        raise ConfigError(source, [ConfigIssue(
            (), f"invalid YAML: unacceptable character #x{e.character:04x}: {e.reason}",
            line)]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(e, "problem", None) or str(e).partition("\n")[0]
        raise ConfigError(source, [ConfigIssue((), f"invalid YAML: {problem}", line)]) from None
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
        later = [] if partial is None else _path_issues(partial[0], where)
        raise ConfigError(source, plain.issues + [i for i in e.issues if i.path not in seen]
                          + later, partial) from None
    conf = _absolute_paths(conf, base)
    issues = plain.issues + _path_issues(conf, where)
    if issues:
        raise ConfigError(source, issues, (conf, tuple(range(len(conf.services)))))
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


def _path_issues(conf: ServerConf, where: Callable[[Path], Optional[int]]
                 ) -> list[ConfigIssue]:
    """What is wrong with the paths once made absolute: ``upgrade_sock`` is bound (and
    connected to) as a Unix socket, whose path AF_UNIX limits."""
    if len(os.fsencode(conf.upgrade_sock)) > UNIX_PATH_MAX:
        return [ConfigIssue(("upgrade_sock",), f"a Unix socket path longer than {UNIX_PATH_MAX}"
                            f" bytes (what AF_UNIX takes): {conf.upgrade_sock!r}",
                            where(("upgrade_sock",)))]
    return []


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


# A configuration is a few KiB; the bound is for `-c /dev/zero` or an endless pipe, which
# would otherwise be read until memory ran out (reading stops one byte past it).
MAX_CONFIG_BYTES = 16 << 20


def load(path: str) -> ServerConf:
    """Read and validate a configuration file (a regular file, or a pipe such as
    ``-c <(...)``, of at most MAX_CONFIG_BYTES)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(path, [ConfigIssue((), f"cannot read: {e.strerror}")]) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(path, [ConfigIssue(
            (), f"larger than {MAX_CONFIG_BYTES >> 20} MiB: not a configuration file")])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(path, [ConfigIssue((), f"not UTF-8 text (byte {data[e.start]:#04x})",
                                             line)]) from None
    return parse_text(text, path)
