"""YAML file -> ServerConf, with the line of every key so errors name file, line and key."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import yaml

from pyngora.config.schema import ConfigError, ConfigIssue, Path, ServerConf, build_server_conf


def _plain(node: yaml.Node, path: Path, lines: dict[Path, int]) -> Any:
    """Compose-tree -> plain data, recording the 1-based line of each key and item."""
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for knode, vnode in node.value:
            key = yaml.safe_load(yaml.serialize(knode)) if not isinstance(knode, yaml.ScalarNode) \
                else _scalar(knode)
            kpath = path + (key,)
            if key in out:
                raise ConfigError("", [ConfigIssue(kpath, "duplicate key", knode.start_mark.line + 1)])
            out[key] = _plain(vnode, kpath, lines)
            lines[kpath] = knode.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_plain(v, path + (i,), lines) for i, v in enumerate(node.value)]
    return _scalar(node)


_constructor = yaml.SafeLoader("")


def _scalar(node: yaml.Node) -> Any:
    return _constructor.construct_object(node, deep=True)


def parse_text(text: str, source: str) -> ServerConf:
    """Parse YAML text into a ServerConf; ConfigError names ``source:line: key: message``."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise ConfigError(source, [ConfigIssue((), f"invalid YAML: {getattr(e, 'problem', e)}",
                                               line)]) from None
    lines: dict[Path, int] = {}
    try:
        raw = _plain(node, (), lines) if node is not None else {}
    except ConfigError as e:
        raise ConfigError(source, e.issues) from None

    def where(path: Path) -> Optional[int]:
        while path:
            if path in lines:
                return lines[path]
            path = path[:-1]
        return lines.get(())
    conf = build_server_conf(raw, source, where)
    return _absolute_paths(conf, os.path.dirname(os.path.abspath(source)))


# Paths the server opens itself; relative ones are taken from the configuration file's
# directory, so that -d (which changes to /) and -s (run from anywhere) agree on them.
_PATH_KEYS = ("pid_file", "upgrade_sock", "error_log", "metrics_dir", "working_directory",
              "ca_file")


def _absolute_paths(conf: ServerConf, base: str) -> ServerConf:
    changes = {k: os.path.join(base, v) for k in _PATH_KEYS
               if isinstance(v := getattr(conf, k), str) and v and not os.path.isabs(v)}
    return dataclasses.replace(conf, **changes) if changes else conf


def load(path: str) -> ServerConf:
    """Read and validate a configuration file."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(path, [ConfigIssue((), f"cannot read: {e.strerror}")]) from None
    return parse_text(text, path)
