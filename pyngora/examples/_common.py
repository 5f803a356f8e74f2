"""What the examples share: their own flags (``--listen``, ``--upstream``) on top of
Pingora's (``-c``, ``-d``, ``-u``, ``-t``...), and the usual Pingora ``main``."""
from __future__ import annotations

import argparse
from typing import Callable, Optional, Sequence

from pyngora.proxy import ProxyHttp, http_proxy_service
from pyngora.server.server import Opt, Server


def parse(argv: Optional[Sequence[str]], description: str,
          default_upstreams: Sequence[str] = ("127.0.0.1:6189",)
          ) -> tuple[argparse.Namespace, Opt]:
    """Split the example's flags from the server's; returns (example flags, Opt)."""
    p = argparse.ArgumentParser(description=description, add_help=False)
    p.add_argument("--listen", default="127.0.0.1:6188", help="address to serve on")
    p.add_argument("--upstream", action="append", default=None,
                   help="backend HOST:PORT (repeat for several)")
    ns, rest = p.parse_known_args(argv)
    if not ns.upstream:
        ns.upstream = list(default_upstreams)
    return ns, Opt.parse_args(rest)


def serve(opt: Opt, name: str, listen: str, make_proxy: Callable[[], ProxyHttp]) -> None:
    """Pingora's main: Server, bootstrap, one proxy service, run_forever."""
    server = Server(opt)
    server.bootstrap()
    svc = http_proxy_service(server.configuration, make_proxy(), name=name)
    svc.add_tcp(listen)
    server.add_service(svc)
    server.run_forever()
