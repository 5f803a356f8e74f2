"""Configuration texts for the three servers of a bench run: the origin (nginx), nginx under
test and pyngora under test. Rendered once per run by the driver into its temp directory.

Fairness rules, kept in one place so a reader can check them:
- both proxies: one worker process, access log off, no connection/request cap that the other
  lacks (nginx's keepalive_requests, 1000 by default on both sides, is lifted to match
  pyngora's unlimited default), upstream keep-alive (nginx ``keepalive 64``, pyngora's pool);
- nginx buffers a 64 KiB response in memory (proxy_buffers 8 x 16k) rather than spilling to a
  temp file, as a tuned production nginx would;
- the origin is one nginx worker serving a fixed string and a 64 KiB file (sendfile).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

__all__ = ["SMALL_BODY", "LARGE_SIZE", "LARGE_PATH", "origin_conf", "nginx_conf", "pyngora_conf"]

# The small response body, identical from the origin, nginx's `return 200` and pyngora's static.
SMALL_BODY = "hello from the bench origin, a small response body\n"
LARGE_SIZE = 64 * 1024
LARGE_PATH = "/64k.bin"

_COMMON = """\
daemon off;
master_process on;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
worker_rlimit_nofile {nofile};
events {{ worker_connections {conns}; }}
"""

_TEMP = """\
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
"""


def _nginx_string(s: str) -> str:
    """``s`` as an nginx double-quoted string (escapes for quote, backslash, newline)."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def origin_conf(d: Path, port: int, www: Path, nofile: int) -> str:
    """The origin: ``/`` answers SMALL_BODY, ``/64k.bin`` is a file sent with sendfile."""
    return _COMMON.format(d=d, nofile=nofile, conns=4096) + f"""\
http {{
    access_log off;
    default_type text/plain;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    open_file_cache max=16;
{_TEMP.format(d=d)}
    server {{
        listen 127.0.0.1:{port} backlog=1024;
        location = {LARGE_PATH} {{ root {www}; }}
        location / {{ return 200 {_nginx_string(SMALL_BODY)}; }}
    }}
}}
"""


def nginx_conf(d: Path, static_port: int, proxy_port: int, h2_port: Optional[int],
               origin_port: int, nofile: int) -> str:
    """nginx under test: a ``return 200`` server (the static scenarios), a reverse proxy to
    the origin, and the same proxy on an h2c (prior knowledge) listener when ``h2_port``."""
    location = """\
        location / {
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffer_size 16k;
            proxy_buffers 8 16k;
        }
"""
    h2 = ""
    if h2_port:
        h2 = f"""\
    server {{
        listen 127.0.0.1:{h2_port} http2 backlog=1024;
{location}    }}
"""
    return _COMMON.format(d=d, nofile=nofile, conns=min(nofile - 64, 20000)) + f"""\
http {{
    access_log off;
    default_type text/plain;
    keepalive_requests 1000000;
{_TEMP.format(d=d)}
    upstream origin {{
        server 127.0.0.1:{origin_port};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{static_port} backlog=1024;
        location / {{ return 200 {_nginx_string(SMALL_BODY)}; }}
    }}
    server {{
        listen 127.0.0.1:{proxy_port} backlog=1024;
{location}    }}
{h2}}}
"""


def _yaml_string(s: str) -> str:
    """``s`` as a YAML double-quoted scalar."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def pyngora_conf(d: Path, static_port: int, proxy_port: Optional[int], h2_port: Optional[int],
                 origin_port: int) -> str:
    """pyngora under test: one worker per service (``threads: 1``), access log off; the
    ``http_proxy`` service only when ``proxy_port``, with an h2c listener when ``h2_port``."""
    text = f"""\
version: 1
threads: 1
pid_file: {d}/pyngora.pid
upgrade_sock: {d}/pyngora-upgrade.sock
metrics_dir: {d}/metrics
access_log: "off"
grace_period_seconds: 2
graceful_shutdown_timeout_seconds: 1
services:
  - name: static
    type: static
    listeners: ["127.0.0.1:{static_port}"]
    headers: {{content-type: text/plain}}
    body: {_yaml_string(SMALL_BODY)}
"""
    if proxy_port:
        listeners = f'["127.0.0.1:{proxy_port}"'
        if h2_port:
            listeners += f', {{address: "127.0.0.1:{h2_port}", h2c: true}}'
        listeners += "]"
        text += f"""\
  - name: proxy
    type: http_proxy
    listeners: {listeners}
    upstreams:
      - name: origin
        backends: [{{addr: "127.0.0.1:{origin_port}"}}]
"""
    return text
