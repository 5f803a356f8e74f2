"""DNS discovery against a small UDP (and TCP) DNS responder written here, on 127.0.0.1:0.

The responder's encoder is independent of pyngora.lb.dns and uses name compression (answers
point at the question name; SRV targets and glue point into earlier names), so the parser is
tested against what real servers send.
"""
from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any, Awaitable, Optional

import pytest

from pyngora.lb import Backend, Backends, DnsDiscovery, DnsError, HealthGroup, HealthService
from pyngora.lb import LoadBalancer
from pyngora.lb.dns import (DnsClient, parse_message, read_name, read_resolv_conf)

A, AAAA, SRV = 1, 28, 33


class Names:
    """Writes names with compression, remembering where each suffix went."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.where: dict[str, int] = {}

    def name(self, name: str) -> None:
        labels = name.rstrip(".").split(".")
        for i in range(len(labels)):
            suffix = ".".join(labels[i:]).lower()
            if suffix in self.where:
                self.buf += struct.pack("!H", 0xC000 | self.where[suffix])
                return
            if len(self.buf) < 0x3FFF:
                self.where[suffix] = len(self.buf)
            self.buf.append(len(labels[i]))
            self.buf += labels[i].encode()
        self.buf.append(0)


class Responder(asyncio.DatagramProtocol):
    """records: {(name, qtype): [value, ...]}; A/AAAA values are IP strings, SRV values are
    (priority, weight, port, target). glue: {target: ip} added to the additional section.
    mode: "ok" | "servfail" | "nxdomain" | "drop" | "truncate"."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, int], list[Any]] = {}
        self.glue: dict[str, str] = {}
        self.mode = "ok"
        self.queries: list[tuple[str, int]] = []
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def answer(self, data: bytes, tcp: bool = False) -> Optional[bytes]:
        qid, _flags, qd = struct.unpack_from("!HHH", data)
        off, labels = 12, []
        while data[off]:
            labels.append(data[off + 1:off + 1 + data[off]].decode())
            off += 1 + data[off]
        qtype = struct.unpack_from("!H", data, off + 1)[0]
        qname = ".".join(labels).lower()
        self.queries.append((qname, qtype))
        if self.mode == "drop":
            return None
        out = Names()
        out.buf += b"\0" * 12
        out.name(qname)
        out.buf += struct.pack("!HH", qtype, 1)
        rcode = {"servfail": 2, "nxdomain": 3}.get(self.mode, 0)
        values = self.records.get((qname, qtype), []) if rcode == 0 else []
        if (qname, qtype) not in self.records and rcode == 0:
            rcode = 3
        truncated = self.mode == "truncate" and not tcp
        answers = additional = 0
        if not truncated:
            for v in values:
                out.name(qname)
                if qtype == SRV:
                    # rdlen is patched after the target, which is compressed like any name.
                    out.buf += struct.pack("!HHIH", qtype, 1, 30, 0)
                    start = len(out.buf)
                    out.buf += struct.pack("!HHH", v[0], v[1], v[2])
                    out.name(v[3])
                    struct.pack_into("!H", out.buf, start - 2, len(out.buf) - start)
                else:
                    fam = socket.AF_INET6 if qtype == AAAA else socket.AF_INET
                    rdata = socket.inet_pton(fam, v)
                    out.buf += struct.pack("!HHIH", qtype, 1, 30, len(rdata)) + rdata
                answers += 1
            if qtype == SRV:
                for v in values:
                    ip = self.glue.get(v[3])
                    if ip:
                        out.name(v[3])
                        out.buf += struct.pack("!HHIH", A, 1, 30, 4) + socket.inet_aton(ip)
                        additional += 1
        flags = 0x8180 | rcode | (0x0200 if truncated else 0)
        struct.pack_into("!HHHHHH", out.buf, 0, qid, flags, 1, answers, 0, additional)
        return bytes(out.buf)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        reply = self.answer(data)
        if reply is not None:
            self.transport.sendto(reply, addr)


async def start_responder() -> tuple[Responder, tuple[str, int], Any]:
    """UDP on 127.0.0.1:0, plus TCP on the same port number (for the truncation fallback).
    That port may be busy on the TCP side: try a few UDP ports."""
    loop = asyncio.get_running_loop()
    for _ in range(20):
        transport, proto = await loop.create_datagram_endpoint(Responder,
                                                               local_addr=("127.0.0.1", 0))
        addr = transport.get_extra_info("sockname")[:2]

        async def tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      proto: Responder = proto) -> None:
            try:
                (n,) = struct.unpack("!H", await reader.readexactly(2))
                reply = proto.answer(await reader.readexactly(n), tcp=True)
                if reply:
                    writer.write(struct.pack("!H", len(reply)) + reply)
                    await writer.drain()
            finally:
                writer.close()

        try:
            tcp_server = await asyncio.start_server(tcp, "127.0.0.1", addr[1])
        except OSError:
            transport.close()
            continue
        return proto, addr, (transport, tcp_server)
    raise AssertionError("no UDP port whose TCP twin is free")


async def stop_responder(handles: Any) -> None:
    transport, tcp_server = handles
    transport.close()
    if tcp_server is not None:
        tcp_server.close()
        await tcp_server.wait_closed()


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


def addrs(backends: Any) -> list[str]:
    return sorted(b.addr for b in backends)


def test_a_records_follow_changes_and_keep_last_good() -> None:
    async def main() -> None:
        dns, server, handles = await start_responder()
        try:
            dns.records[("web.test", A)] = ["10.0.0.1", "10.0.0.2"]
            disc = DnsDiscovery("web.test", 8080, refresh_seconds=0.1, resolver=server,
                                timeout=1.0, attempts=1)
            backends = Backends(disc)
            assert await backends.update()
            assert addrs(backends.get()) == ["10.0.0.1:8080", "10.0.0.2:8080"]
            dns.records[("web.test", A)] = ["10.0.0.2", "10.0.0.3", "10.0.0.4"]
            assert await backends.update()
            assert addrs(backends.get()) == ["10.0.0.2:8080", "10.0.0.3:8080", "10.0.0.4:8080"]
            good = backends.get()
            for mode in ("servfail", "drop", "nxdomain"):
                dns.mode = mode
                assert not await backends.update()
                assert backends.get() == good, mode
                assert disc.last_error
            dns.mode = "ok"
            dns.records[("web.test", A)] = []  # NOERROR, no record: keep too
            assert not await backends.update() and backends.get() == good
            dns.records[("web.test", A)] = ["10.0.0.9"]
            assert await backends.update() and addrs(backends.get()) == ["10.0.0.9:8080"]
            assert disc.last_error is None
        finally:
            await stop_responder(handles)
    run(main())


def test_first_failure_raises_and_aaaa() -> None:
    async def main() -> None:
        dns, server, handles = await start_responder()
        try:
            dns.mode = "servfail"
            disc = DnsDiscovery("v6.test", 443, kind="AAAA", resolver=server, timeout=2.0,
                                attempts=1)
            with pytest.raises(DnsError) as err:
                await disc.discover()
            assert err.value.rcode == 2
            dns.mode = "ok"
            dns.records[("v6.test", AAAA)] = ["2001:db8::1", "::1"]
            assert addrs(await disc.discover()) == ["[2001:db8::1]:443", "[::1]:443"]
            assert ("v6.test", AAAA) in dns.queries
        finally:
            await stop_responder(handles)
    run(main())


def test_srv_ports_weights_priority_and_glue() -> None:
    async def main() -> None:
        dns, server, handles = await start_responder()
        try:
            name = "_http._tcp.api.svc.test"
            dns.records[(name, SRV)] = [
                (10, 5, 8001, "pod-a.api.svc.test"),
                (10, 1, 8002, "pod-b.api.svc.test"),
                (10, 0, 8003, "pod-c.other.test"),   # no glue: resolved with an A query
                (20, 9, 9000, "backup.api.svc.test"),  # higher priority number: not used
            ]
            dns.glue = {"pod-a.api.svc.test": "10.1.0.1", "pod-b.api.svc.test": "10.1.0.2"}
            dns.records[("pod-c.other.test", A)] = ["10.1.0.3"]
            disc = DnsDiscovery(name, kind="SRV", resolver=server, timeout=2.0, attempts=1)
            found = {b.addr: b.weight for b in await disc.discover()}
            assert found == {"10.1.0.1:8001": 5, "10.1.0.2:8002": 1, "10.1.0.3:8003": 1}
            assert ("pod-a.api.svc.test", A) not in dns.queries  # glue was used
            lb = LoadBalancer(Backends(disc))
            assert await lb.update()
            picks = [lb.select(b"").addr for _ in range(700)]
            assert picks.count("10.1.0.1:8001") == 500
        finally:
            await stop_responder(handles)
    run(main())


def test_truncated_udp_answer_falls_back_to_tcp() -> None:
    async def main() -> None:
        dns, server, handles = await start_responder()
        try:
            dns.records[("big.test", A)] = [f"10.2.0.{i}" for i in range(1, 60)]
            dns.mode = "truncate"
            found = await DnsDiscovery("big.test", 80, resolver=server, timeout=2.0,
                                       attempts=1).discover()
            assert len(found) == 59
        finally:
            await stop_responder(handles)
    run(main())


def test_health_service_follows_dns_and_workers_follow_table(tmp_path: Any) -> None:
    path = str(tmp_path / "health.tbl")

    async def main() -> None:
        dns, server, handles = await start_responder()
        dns.records[("app.test", A)] = ["127.0.0.1"]
        group = HealthGroup("app", Backends(DnsDiscovery("app.test", 9, refresh_seconds=0.1,
                                                         resolver=server, timeout=2.0,
                                                         attempts=1)),
                            None, interval_seconds=0.1)
        shutdown, ready = asyncio.Event(), asyncio.Event()
        task = asyncio.ensure_future(HealthService(path, [group]).run(shutdown, ready.set))
        try:
            await asyncio.wait_for(ready.wait(), 10)
            lb = LoadBalancer([], passive_down_seconds=1)
            lb.sync_interval = 0.0
            lb.attach_health_table(path, "app", ext={"tls": False})
            assert lb.backends() == (Backend("127.0.0.1:9"),)
            assert lb.select(b"").ext == {"tls": False}
            dns.records[("app.test", A)] = ["127.0.0.2", "127.0.0.3"]
            for _ in range(300):
                if len(lb.backends()) == 2:
                    break
                await asyncio.sleep(0.02)
            assert addrs(lb.backends()) == ["127.0.0.2:9", "127.0.0.3:9"]
            dns.mode = "servfail"
            n = len(dns.queries)
            for _ in range(300):  # a few failed refreshes
                if len(dns.queries) >= n + 3:
                    break
                await asyncio.sleep(0.02)
            assert addrs(lb.backends()) == ["127.0.0.2:9", "127.0.0.3:9"]
            lb.close()
        finally:
            shutdown.set()
            await asyncio.wait_for(task, 10)
            await stop_responder(handles)
    run(main())


def test_parser_rejects_pointer_loops_and_reads_compressed_names() -> None:
    msg = bytearray(b"\x00" * 12) + b"\x03abc\x00" + b"\x03xyz\xc0\x0c"
    assert read_name(bytes(msg), 12) == ("abc", 17)
    assert read_name(bytes(msg), 17) == ("xyz.abc", 23)
    loop = bytes(12) + b"\xc0\x0c"
    with pytest.raises(DnsError):
        read_name(loop, 12)
    with pytest.raises(DnsError):
        parse_message(b"\x00\x01\x00\x00" + bytes(8))  # a query, not a response


def test_resolv_conf_parsing(tmp_path: Any) -> None:
    f = tmp_path / "resolv.conf"
    f.write_text("# k8s pod\nnameserver 10.96.0.10\nnameserver fe80::1%eth0\n"
                 "search ns.svc.cluster.local svc.cluster.local cluster.local\n"
                 "options ndots:5 timeout:2 attempts:3 rotate\n")
    conf = read_resolv_conf(str(f))
    assert conf.nameservers == [("10.96.0.10", 53), ("fe80::1", 53)]
    assert conf.search[0] == "ns.svc.cluster.local" and conf.ndots == 5
    assert (conf.timeout, conf.attempts) == (2.0, 3)
    client = DnsClient(resolv_conf=str(f))
    assert client.candidates("my-svc")[0] == "my-svc.ns.svc.cluster.local"
    assert client.candidates("my-svc")[-1] == "my-svc"
    assert client.candidates("a.b.c.d.e.f") == ["a.b.c.d.e.f"] + [
        "a.b.c.d.e.f." + d for d in conf.search]
    assert client.candidates("abs.name.") == ["abs.name"]
    assert read_resolv_conf(str(tmp_path / "missing")).nameservers == [("127.0.0.1", 53)]


def test_search_list_against_responder(tmp_path: Any) -> None:
    async def main() -> None:
        dns, server, handles = await start_responder()
        try:
            f = tmp_path / "resolv.conf"
            f.write_text(f"nameserver {server[0]}\nsearch ns.svc.test svc.test\n"
                         "options ndots:5 timeout:2 attempts:1\n")
            client = DnsClient(resolv_conf=str(f))
            client.conf.nameservers = [server]  # port is not expressible in resolv.conf
            dns.records[("web.svc.test", A)] = ["10.3.0.1"]
            assert await client.resolve("web", "A") == ["10.3.0.1"]
            assert dns.queries[:2] == [("web.ns.svc.test", A), ("web.svc.test", A)]
        finally:
            await stop_responder(handles)
    run(main())
