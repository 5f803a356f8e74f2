"""H2Conn's open-stream count against h2's own, on every mix of stream states."""
from __future__ import annotations

import itertools

import h2.config
import h2.connection
import pytest
from h2.stream import StreamState

from pyngora.protocols.h2_conn import H2Conn

REQUEST = [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http"), (b":authority", b"x")]
STATES = list(StreamState)


def _conn(cls: type, client_side: bool) -> h2.connection.H2Connection:
    c = cls(h2.config.H2Configuration(client_side=client_side, header_encoding=None))
    c.initiate_connection()
    return c


def _with_states(cls: type, states: tuple[StreamState, ...]) -> h2.connection.H2Connection:
    """A client connection holding one stream per entry of ``states`` (ids 1, 2, 3, ...:
    both parities), each forced into its state."""
    c = _conn(cls, client_side=True)
    for i, state in enumerate(states):
        sid = 1 + 2 * i
        c.send_headers(sid, REQUEST, end_stream=False)
    # even ids too: moved over from streams made under odd ids (the count only reads ids)
    for i, state in enumerate(states):
        stream = c.streams.pop(1 + 2 * i)
        sid = i + 1
        stream.stream_id = sid
        stream.state_machine.state = state
        c.streams[sid] = stream
    return c


@pytest.mark.parametrize("states", list(itertools.product(STATES, repeat=3)) +
                         [tuple(STATES), tuple(reversed(STATES)) * 2])
@pytest.mark.parametrize("remainder", [0, 1])
def test_the_count_and_the_forgotten_streams_are_h2s(states: tuple, remainder: int) -> None:
    ours = _with_states(H2Conn, states)
    theirs = _with_states(h2.connection.H2Connection, states)
    assert H2Conn._open_streams(ours, remainder) == \
        h2.connection.H2Connection._open_streams(theirs, remainder)
    assert list(ours.streams) == list(theirs.streams)
    assert dict(ours._closed_streams) == dict(theirs._closed_streams)


def _counts(c: h2.connection.H2Connection) -> tuple[int, int]:
    """(ours, h2's) count of the open odd (client-initiated) streams of ``c``."""
    return c._open_streams(1), h2.connection.H2Connection._open_streams(c, 1)


def test_a_real_exchange_counts_as_h2_does() -> None:
    """Client and server H2Conn through real frames: requests opened, half-closed, answered,
    reset; each side's count equals h2's walk at every step."""
    client, server = _conn(H2Conn, True), _conn(H2Conn, False)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    for sid in range(1, 40, 2):
        client.send_headers(sid, REQUEST, end_stream=sid % 3 == 0)
    server.receive_data(client.data_to_send())
    assert _counts(server) == _counts(client) == (20, 20)
    for sid in range(1, 20, 2):
        server.send_headers(sid, [(b":status", b"200")], end_stream=True)
    client.reset_stream(21)
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    # 1-19 ended by the server: closed where the client had ended too (3, 9, 15), else
    # half-closed; 21 reset; 23-39 open
    assert _counts(server) == _counts(client) == (16, 16)
    assert 21 not in server.streams and 3 not in server.streams and 1 in server.streams
