"""A small stub DNS resolver (RFC 1035, 2782, 6891), stdlib only, for `DnsDiscovery`.

What it does: builds a recursive query (with an EDNS0 OPT record advertising a 1232-byte UDP
payload, so a Kubernetes service with many pods fits), sends it over UDP with a timeout and a
random id, retries ``attempts`` times, falls back to TCP when the answer is truncated (TC),
and parses A, AAAA, CNAME and SRV records, name compression included (with a bound on pointer
jumps against loops). The default nameserver, search list, ``ndots``, ``timeout`` and
``attempts`` come from /etc/resolv.conf, so inside a Kubernetes pod ``my-svc`` resolves like
it does for any other program there. Runs in the prober process, not on the request path.
"""
from __future__ import annotations

import asyncio
import os
import random
import socket
import struct
from dataclasses import dataclass, field
from typing import Optional, Union

__all__ = ["DnsError", "DnsTimeout", "SrvRecord", "Record", "Message", "ResolvConf",
           "read_resolv_conf", "build_query", "parse_message", "DnsClient",
           "TYPE_A", "TYPE_AAAA", "TYPE_CNAME", "TYPE_SRV", "TYPE_OPT",
           "RCODE_NOERROR", "RCODE_SERVFAIL", "RCODE_NXDOMAIN"]

TYPE_A, TYPE_CNAME, TYPE_AAAA, TYPE_SRV, TYPE_OPT = 1, 5, 28, 33, 41
CLASS_IN = 1
RCODE_NOERROR, RCODE_FORMERR, RCODE_SERVFAIL, RCODE_NXDOMAIN = 0, 1, 2, 3
_RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}
_TYPES = {"A": TYPE_A, "AAAA": TYPE_AAAA, "SRV": TYPE_SRV, "CNAME": TYPE_CNAME}
EDNS_PAYLOAD = 1232
_HEADER = struct.Struct("!HHHHHH")
_RR = struct.Struct("!HHIH")
_SRV = struct.Struct("!HHH")


class DnsError(Exception):
    """The resolver gave no usable answer. ``rcode`` is the DNS response code when there was
    one (2 SERVFAIL, 3 NXDOMAIN, ...), else None."""

    def __init__(self, msg: str, rcode: Optional[int] = None) -> None:
        super().__init__(msg)
        self.rcode = rcode


class DnsTimeout(DnsError):
    """No answer within timeout x attempts."""


@dataclass(frozen=True)
class SrvRecord:
    priority: int
    weight: int
    port: int
    target: str


@dataclass(frozen=True)
class Record:
    """One resource record. ``value``: an IP string (A/AAAA), a name (CNAME), a SrvRecord, or
    the raw bytes of other types."""
    name: str
    type: int
    ttl: int
    value: Union[str, SrvRecord, bytes]


@dataclass
class Message:
    id: int
    rcode: int
    truncated: bool
    answers: list[Record] = field(default_factory=list)
    additionals: list[Record] = field(default_factory=list)


@dataclass
class ResolvConf:
    nameservers: list[tuple[str, int]] = field(default_factory=lambda: [("127.0.0.1", 53)])
    search: list[str] = field(default_factory=list)
    ndots: int = 1
    timeout: float = 5.0
    attempts: int = 2


def read_resolv_conf(path: str = "/etc/resolv.conf") -> ResolvConf:
    """Parse nameserver, search/domain and options (ndots, timeout, attempts) like glibc does.
    A missing or empty file gives 127.0.0.1:53 (glibc's default). Called once per client."""
    conf = ResolvConf(nameservers=[])
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    for line in lines:
        parts = line.split("#", 1)[0].split(";", 1)[0].split()
        if not parts:
            continue
        key, args = parts[0], parts[1:]
        if key == "nameserver" and args:
            host = args[0].split("%", 1)[0]  # drop an IPv6 zone id
            conf.nameservers.append((host, 53))
        elif key in ("search", "domain"):
            conf.search = [d.rstrip(".") for d in args if d.rstrip(".")]
        elif key == "options":
            for opt in args:
                name, _, val = opt.partition(":")
                if name in ("ndots", "timeout", "attempts") and val.isdigit():
                    n = int(val)
                    if name == "ndots":
                        conf.ndots = min(n, 15)
                    elif name == "timeout":
                        conf.timeout = float(max(1, min(n, 30)))
                    else:
                        conf.attempts = max(1, min(n, 5))
    if not conf.nameservers:
        conf.nameservers = [("127.0.0.1", 53)]
    return conf


def _encode_name(name: str) -> bytes:
    out = bytearray()
    name = name.rstrip(".")
    if name:
        for label in name.split("."):
            raw = label.encode("idna") if not label.isascii() else label.encode()
            if not 0 < len(raw) < 64:
                raise DnsError(f"bad DNS label in {name!r}")
            out.append(len(raw))
            out += raw
    out.append(0)
    if len(out) > 255:
        raise DnsError(f"DNS name too long: {name!r}")
    return bytes(out)


def build_query(name: str, qtype: int, qid: int, edns: bool = True) -> bytes:
    """One question, recursion desired, optional EDNS0 OPT record."""
    header = _HEADER.pack(qid, 0x0100, 1, 0, 0, 1 if edns else 0)
    q = _encode_name(name) + struct.pack("!HH", qtype, CLASS_IN)
    if edns:
        # root name, TYPE OPT, CLASS = UDP payload size, TTL = ext rcode/version/flags, RDLEN 0
        q += b"\x00" + struct.pack("!HHIH", TYPE_OPT, EDNS_PAYLOAD, 0, 0)
    return header + q


def read_name(data: bytes, off: int) -> tuple[str, int]:
    """Read a possibly compressed name at ``off``; returns (name, offset after it in the
    original position). Raises DnsError on loops, bad pointers or truncation."""
    labels: list[str] = []
    end = -1
    jumps = 0
    n = len(data)
    while True:
        if off >= n:
            raise DnsError("truncated name")
        length = data[off]
        if length & 0xC0 == 0xC0:
            if off + 1 >= n:
                raise DnsError("truncated compression pointer")
            ptr = ((length & 0x3F) << 8) | data[off + 1]
            if end < 0:
                end = off + 2
            jumps += 1
            if jumps > 64 or ptr >= n:
                raise DnsError("bad compression pointer")
            off = ptr
            continue
        if length & 0xC0:
            raise DnsError("unsupported label type")
        off += 1
        if length == 0:
            break
        if off + length > n:
            raise DnsError("truncated label")
        labels.append(data[off:off + length].decode("ascii", errors="replace"))
        off += length
    return ".".join(labels).lower(), (end if end >= 0 else off)


def _read_rr(data: bytes, off: int) -> tuple[Record, int]:
    name, off = read_name(data, off)
    if off + _RR.size > len(data):
        raise DnsError("truncated record")
    rtype, _rclass, ttl, rdlen = _RR.unpack_from(data, off)
    off += _RR.size
    rdata_end = off + rdlen
    if rdata_end > len(data):
        raise DnsError("truncated rdata")
    value: Union[str, SrvRecord, bytes]
    if rtype == TYPE_A and rdlen == 4:
        value = socket.inet_ntop(socket.AF_INET, data[off:rdata_end])
    elif rtype == TYPE_AAAA and rdlen == 16:
        value = socket.inet_ntop(socket.AF_INET6, data[off:rdata_end])
    elif rtype == TYPE_CNAME:
        value, _ = read_name(data, off)
    elif rtype == TYPE_SRV and rdlen >= 7:
        prio, weight, port = _SRV.unpack_from(data, off)
        target, _ = read_name(data, off + 6)
        value = SrvRecord(prio, weight, port, target)
    else:
        value = bytes(data[off:rdata_end])
    return Record(name, rtype, ttl, value), rdata_end


def parse_message(data: bytes) -> Message:
    """Parse a response. Raises DnsError when it is not a well-formed DNS response."""
    if len(data) < _HEADER.size:
        raise DnsError("short DNS message")
    qid, flags, qd, an, ns, ar = _HEADER.unpack_from(data, 0)
    if not flags & 0x8000:
        raise DnsError("not a response")
    msg = Message(qid, flags & 0x000F, bool(flags & 0x0200))
    off = _HEADER.size
    for _ in range(qd):
        _, off = read_name(data, off)
        off += 4
    if off > len(data):
        raise DnsError("truncated question")
    if msg.truncated:
        return msg  # the caller retries over TCP; the partial records are not trusted
    for i in range(an + ns + ar):
        rr, off = _read_rr(data, off)
        if i < an:
            msg.answers.append(rr)
        elif i >= an + ns:
            msg.additionals.append(rr)
    return msg


class _UdpExchange(asyncio.DatagramProtocol):
    def __init__(self, qid: int, fut: "asyncio.Future[bytes]") -> None:
        self.qid = qid
        self.fut = fut

    def datagram_received(self, data: bytes, addr: object) -> None:
        # Only the answer to our id; anything else (late answers, spoofing tries) is dropped.
        if len(data) >= 2 and struct.unpack_from("!H", data)[0] == self.qid and not self.fut.done():
            self.fut.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.fut.done():
            self.fut.set_exception(exc)


class DnsClient:
    """Asks one nameserver at a time (the next one on timeout). ``nameserver`` overrides
    resolv.conf; ``timeout``/``attempts`` bound each query (defaults from resolv.conf)."""

    def __init__(self, nameserver: Optional[tuple[str, int]] = None, *,
                 timeout: Optional[float] = None, attempts: Optional[int] = None,
                 resolv_conf: str = "/etc/resolv.conf") -> None:
        conf = read_resolv_conf(resolv_conf)
        if nameserver is not None:
            conf.nameservers = [(nameserver[0], int(nameserver[1]))]
            conf.search = []  # an explicit server is asked for the name as written
        self.conf = conf
        self.timeout = conf.timeout if timeout is None else float(timeout)
        self.attempts = conf.attempts if attempts is None else max(1, int(attempts))

    async def query(self, name: str, qtype: int) -> Message:
        """One question to the nameservers; returns the response (any rcode) or raises
        DnsTimeout / DnsError."""
        last: Exception = DnsTimeout(f"no answer for {name}")
        for _ in range(self.attempts):
            for server in self.conf.nameservers:
                qid = random.getrandbits(16)
                query = build_query(name, qtype, qid)
                try:
                    data = await self._udp(server, query, qid)
                    msg = parse_message(data)
                    if msg.truncated:
                        msg = parse_message(await self._tcp(server, build_query(name, qtype,
                                                                                qid, False)))
                    if msg.rcode == RCODE_FORMERR:
                        # An old server that rejects EDNS: ask again without it.
                        msg = parse_message(await self._udp(server, build_query(
                            name, qtype, qid, False), qid))
                    return msg
                except asyncio.TimeoutError:
                    last = DnsTimeout(f"DNS timeout for {name} from {server[0]}:{server[1]}")
                except (OSError, DnsError) as exc:
                    last = exc if isinstance(exc, DnsError) else DnsError(
                        f"DNS {server[0]}:{server[1]}: {exc}")
        raise last

    async def _udp(self, server: tuple[str, int], query: bytes, qid: int) -> bytes:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bytes] = loop.create_future()
        family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _UdpExchange(qid, fut), remote_addr=server, family=family)
        try:
            transport.sendto(query)
            return await asyncio.wait_for(fut, self.timeout)
        finally:
            transport.close()

    async def _tcp(self, server: tuple[str, int], query: bytes) -> bytes:
        async def exchange() -> bytes:
            reader, writer = await asyncio.open_connection(server[0], server[1])
            try:
                writer.write(struct.pack("!H", len(query)) + query)
                await writer.drain()
                (length,) = struct.unpack("!H", await reader.readexactly(2))
                return await reader.readexactly(length)
            finally:
                writer.close()
        return await asyncio.wait_for(exchange(), self.timeout)

    def candidates(self, name: str) -> list[str]:
        """The names to try for ``name``, in order, per resolv.conf's search and ndots."""
        if name.endswith("."):
            return [name.rstrip(".")]
        searched = [f"{name}.{d}" for d in self.conf.search]
        if name.count(".") >= self.conf.ndots:
            return [name] + searched
        return searched + [name]

    async def lookup(self, name: str, qtype: int) -> tuple[list[Record], list[Record]]:
        """Records of ``qtype`` for ``name`` (search list applied) and the additional section.
        Raises DnsError with the rcode when no candidate has any (NXDOMAIN, SERVFAIL, empty)."""
        error: Optional[DnsError] = None
        for cand in self.candidates(name):
            try:
                msg = await self.query(cand, qtype)
            except DnsError as exc:
                error = exc
                continue
            records = [r for r in msg.answers if r.type == qtype]
            if msg.rcode == RCODE_NOERROR and records:
                return records, msg.additionals
            if msg.rcode not in (RCODE_NOERROR, RCODE_NXDOMAIN) or error is None:
                error = DnsError(f"{cand} {_type_name(qtype)}: "
                                 f"{_RCODES.get(msg.rcode, msg.rcode)}"
                                 f"{'' if msg.rcode else ' (no records)'}", msg.rcode)
        raise error or DnsError(f"{name}: no answer")

    async def resolve(self, name: str, kind: str = "A") -> list[Union[str, SrvRecord]]:
        """Values of the ``kind`` records (A/AAAA: IP strings, SRV: SrvRecords)."""
        records, _ = await self.lookup(name, _TYPES[kind.upper()])
        return [r.value for r in records]  # type: ignore[misc]


def _type_name(qtype: int) -> str:
    for k, v in _TYPES.items():
        if v == qtype:
            return k
    return str(qtype)


def _env_resolver() -> Optional[tuple[str, int]]:
    """PYNGORA_DNS_RESOLVER=host:port overrides resolv.conf (tests, odd networks)."""
    val = os.environ.get("PYNGORA_DNS_RESOLVER")
    if not val:
        return None
    host, _, port = val.rpartition(":")
    return host.strip("[]"), int(port)
