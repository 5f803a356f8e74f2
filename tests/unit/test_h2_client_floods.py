"""The HTTP/2 origin flood rule (protocols/h2_client.py) against legitimate traffic that looks
like a flood: grpc-go's BDP pings on a client stream, DATA in flight across our RST_STREAM,
many small frames and SETTINGS per request; and DATA on a reset stream beyond what could be
in flight, which still counts. The origin is the h2 library (or raw frames), in memory."""
from __future__ import annotations

import h2.config
import h2.connection
import h2.events

import pyngora.protocols.h2_client as h2c

FIELDS = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"o"),
          (b":path", b"/svc/Stream"), (b"content-type", b"application/grpc"),
          (b"te", b"trailers")]


class Clock:
    t = 1000.0

    def __call__(self) -> float:
        return self.t


def pair(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(h2c, "_clock", clock)
    client = h2c.H2ClientConn()
    client.initiate()
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False,
                                                                 header_encoding=None))
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    events = client.feed(server.data_to_send())
    server.receive_data(client.data_to_send())  # SETTINGS ACK
    client.feed(server.data_to_send())
    return clock, client, server, events


def goaways(events):
    return [e for e in events if isinstance(e, h2c.GoAway)]


def test_bdp_pings_of_a_grpc_go_origin_on_a_client_stream(monkeypatch):
    """grpc-go (bdpEstimator): on the first DATA after each PING ACK it sends a
    WINDOW_UPDATE of the bytes so far (conn level) and a BDP PING. A client-streaming RPC of
    small messages, 100 messages a second: 2 overhead per message vs a fade of 100/s."""
    clock, client, server, _ = pair(monkeypatch)
    sid = client.start_request(FIELDS, False)
    server.receive_data(client.data_to_send())
    server.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    client.feed(server.data_to_send())
    for i in range(3000):
        clock.t += 0.01  # 100 messages a second
        client.send_body(sid, b"\x00\x00\x00\x00\x0a" + b"m" * 10)
        for ev in server.receive_data(client.data_to_send()):
            if isinstance(ev, h2.events.DataReceived):
                server.acknowledge_received_data(ev.flow_controlled_length, sid)
        server.increment_flow_control_window(15)  # conn-level WINDOW_UPDATE (fc.reset())
        server.ping(b"bdpping!")
        out = client.feed(server.data_to_send())
        server.receive_data(client.data_to_send())  # the PING ACK
        if goaways(out):
            raise AssertionError(f"killed after {i + 1} messages ({(i + 1) / 100:.1f} s): "
                                 f"{goaways(out)[0].reason}")


def test_data_in_flight_after_we_cancel_a_stream(monkeypatch):
    """A client goes away mid-response: the proxy resets the upstream stream (CANCEL). The
    origin had already written small DATA frames (server-streaming gRPC / SSE ticks) within
    the stream window we granted; each lands on a closed stream and counts as overhead."""
    clock, client, server, _ = pair(monkeypatch)
    sid = client.start_request(FIELDS, True)
    server.receive_data(client.data_to_send())
    server.send_headers(sid, [(b":status", b"200")])
    client.feed(server.data_to_send())
    for _ in range(1200):  # 1,200 messages of 20 bytes: 24 KB, inside the 64 KiB window
        server.send_data(sid, b"\x00\x00\x00\x00\x0f" + b"t" * 15)
    in_flight = server.data_to_send()
    client.reset(sid)  # the downstream client went away
    out = client.feed(in_flight)  # crossing our RST_STREAM
    assert not goaways(out), goaways(out)[0].reason


def test_fine_many_small_data_frames_and_settings_per_request(monkeypatch):
    """Checked fine: 5,000 small DATA frames on an open stream, and a SETTINGS frame (6
    entries) after each of 300 requests, never count past the limit."""
    clock, client, server, _ = pair(monkeypatch)
    sid = client.start_request(FIELDS, True)
    server.receive_data(client.data_to_send())
    server.send_headers(sid, [(b":status", b"200")])
    client.feed(server.data_to_send())
    for _ in range(5000):
        server.send_data(sid, b"\x00\x00\x00\x00\x01x")
        out = client.feed(server.data_to_send())
        for e in out:
            if isinstance(e, h2c.Data):
                client.consumed(sid, len(e.data))
        server.receive_data(client.data_to_send())
        assert not goaways(out)
    for i in range(300):
        s = client.start_request(FIELDS, True)
        server.receive_data(client.data_to_send())
        server.send_headers(s, [(b":status", b"200")], end_stream=True)
        server.update_settings({3: 100 + i % 7, 4: 65535, 5: 16384, 6: 65536, 2: 0, 1: 4096})
        out = client.feed(server.data_to_send())
        server.receive_data(client.data_to_send())
        assert not goaways(out)


def test_data_on_a_reset_stream_beyond_its_window_still_counts(monkeypatch):
    """What a reset stream could have in flight is free, no more: raw DATA frames on it past
    its window end the connection with ENHANCE_YOUR_CALM."""
    from hyperframe.frame import DataFrame
    clock, client, server, _ = pair(monkeypatch)
    sid = client.start_request(FIELDS, True)
    server.receive_data(client.data_to_send())
    server.send_headers(sid, [(b":status", b"200")])
    client.feed(server.data_to_send())
    client.reset(sid)
    frame = DataFrame(sid)
    frame.data = b"x" * 200
    raw = frame.serialize()
    free = client.stream_window // 200  # frames the reset stream's window covers
    out = client.feed(raw * free)
    assert not goaways(out)
    out = client.feed(raw * (h2c.MAX_OVERHEAD_FRAMES + 100))
    assert goaways(out) and goaways(out)[0].error_code == h2c.ENHANCE_YOUR_CALM, out[-3:]
