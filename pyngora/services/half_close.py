"""Half-closing a downstream connection: its FIN sent now, reading left open."""
from __future__ import annotations

import _socket
import asyncio
import socket

__all__ = ["send_fin"]

# Sockets whose sending side send_fin shuts down itself (TLS has its own close_notify and
# never gets there: its transport cannot write_eof).
_FIN_FAMILIES = (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX)


def send_fin(transport: asyncio.Transport) -> bool:
    """Shut the socket's sending side down now (FIN), the response being fully written; False
    when the transport has no plain socket to do it on.

    ``write_eof`` would do it only in the next loop iteration (libuv waits for the socket to
    be writable). By then a client that read its response has often closed first, so the
    TIME_WAIT state lands on the client, whose next connect() must then search for a free
    port among them: under connection churn wrk spent half its time there (RESULTS.md, "the
    FIN first"). nginx closes first too. Reading goes on (the lingering close) either way.

    uvloop does not know of this shutdown: a write after it fails with EPIPE and quietly
    closes the connection (write_eof would have raised instead). Nothing writes after
    ``H1Connection._linger`` (it clears the pending requests; 101 tunnels close through ``_close``)."""
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in _FIN_FAMILIES:
        return False
    # The C socket type, not socket.socket: its Python-level __init__ cost 2 % of a churned
    # request's CPU (py-spy).
    s = _socket.socket(sock.family, socket.SOCK_STREAM, 0, sock.fileno())
    try:
        s.shutdown(socket.SHUT_WR)
    finally:
        s.detach()  # the descriptor stays uvloop's
    return True
