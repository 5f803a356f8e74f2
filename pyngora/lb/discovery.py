"""Service discovery: where a group's backends come from. Pingora's `discovery` module.

- `StaticDiscovery`: the list from the configuration, forever.
- `DnsDiscovery`: re-resolved every ``refresh_seconds`` (by the prober process, which publishes
  the set to the workers through the health table). ``kind="A"``/``"AAAA"``: every address of
  the name, on ``port``; ``kind="SRV"``: every target of the lowest priority with its port and
  weight (RFC 2782; higher priorities are backups and are not used). When DNS fails - timeout,
  SERVFAIL, NXDOMAIN, no record - the last good set is kept: an unreachable DNS server or a
  brief NXDOMAIN during a redeploy never empties a group (backends that are really gone then
  fail their health checks instead).
"""
from __future__ import annotations

import ipaddress
import logging
from typing import Any, Iterable, Optional, Union

from pyngora.lb.backend import Backend, BackendLike, as_backend
from pyngora.lb.dns import (TYPE_A, TYPE_AAAA, TYPE_SRV, DnsClient, DnsError, SrvRecord,
                            _env_resolver)

log = logging.getLogger("pyngora.lb")

__all__ = ["StaticDiscovery", "DnsDiscovery", "unroutable"]


class StaticDiscovery:
    """A fixed set of backends (Pingora's Static)."""

    refresh_seconds: Optional[float] = None

    def __init__(self, backends: Iterable[BackendLike]) -> None:
        self._backends = tuple(sorted({as_backend(b) for b in backends}))

    def initial(self) -> tuple[Backend, ...]:
        """The set, known without I/O (Backends uses it before any event loop runs)."""
        return self._backends

    async def discover(self) -> tuple[Backend, ...]:
        return self._backends

    def __repr__(self) -> str:
        return f"StaticDiscovery({[b.addr for b in self._backends]})"


class DnsDiscovery:
    """Backends from DNS. ``resolver`` is (host, port); default: $PYNGORA_DNS_RESOLVER, else
    the first nameserver of /etc/resolv.conf (whose search list and ndots then apply).
    ``weight`` and ``ext`` are given to every A/AAAA backend (SRV carries its own weights).
    ``last_error`` says why the last refresh failed (None after a success)."""

    def __init__(self, name: str, port: Optional[int] = None, refresh_seconds: float = 5.0,
                 kind: str = "A", resolver: Optional[tuple[str, int]] = None, *,
                 timeout: Optional[float] = None, attempts: Optional[int] = None,
                 weight: int = 1, ext: Optional[dict[str, Any]] = None) -> None:
        kind = kind.upper()
        if kind not in ("A", "AAAA", "SRV"):
            raise ValueError(f"dns discovery kind {kind!r}: expected A, AAAA or SRV")
        if kind != "SRV" and not (port and 0 < int(port) < 65536):
            raise ValueError(f"dns discovery of {name!r} ({kind}) needs a port")
        if refresh_seconds <= 0:
            raise ValueError("refresh_seconds must be > 0")
        self.name = name
        self.port = int(port) if port else None
        self.refresh_seconds = float(refresh_seconds)
        self.kind = kind
        self.weight = weight
        self.ext = ext
        self.client = DnsClient(resolver or _env_resolver(), timeout=timeout, attempts=attempts)
        self.last_good: Optional[tuple[Backend, ...]] = None
        self.last_error: Optional[str] = None
        # Addresses of the last answer (and of the one being read) that no backend can have.
        self._dropped: set[str] = set()
        self._dropping: set[str] = set()

    async def discover(self) -> tuple[Backend, ...]:
        """Resolve now. On failure returns the last good set (and logs why); raises DnsError
        only when there has never been a good one."""
        self._dropping = set()
        try:
            found = await self._resolve()
            if not found:
                raise DnsError(f"{self.name} {self.kind}: no usable record")
        except DnsError as exc:
            self._report_dropped()
            self.last_error = str(exc)
            if self.last_good is None:
                raise
            log.warning("dns discovery of %s failed (%s); keeping the last %d backends",
                        self.name, exc, len(self.last_good))
            return self.last_good
        self.last_error = None
        self.last_good = tuple(sorted(set(found)))
        self._report_dropped()
        return self.last_good

    def _report_dropped(self) -> None:
        """Warn when the addresses dropped from the answer changed (not at every refresh)."""
        dropping = self._dropping
        if dropping and dropping != self._dropped:
            log.warning("dns discovery of %s: ignoring %s (no backend can be there)",
                        self.name, ", ".join(sorted(dropping)))
        self._dropped = dropping

    async def _resolve(self) -> list[Backend]:
        if self.kind == "SRV":
            return await self._resolve_srv()
        qtype = TYPE_A if self.kind == "A" else TYPE_AAAA
        records, _ = await self.client.lookup(self.name, qtype)
        return [self._backend(ip, self.port, self.weight)
                for ip in self._usable(str(r.value) for r in records)]

    def _usable(self, ips: Iterable[str]) -> list[str]:
        """The addresses of ``ips`` a backend may have (see ``unroutable``); the others go to
        ``_dropping`` (reported by ``discover``). Runs once per refresh."""
        kept: list[str] = []
        for ip in ips:
            if unroutable(ip):
                self._dropping.add(ip)
            else:
                kept.append(ip)
        return kept

    def _backend(self, ip: str, port: Optional[int], weight: int) -> Backend:
        host = f"[{ip}]" if ":" in ip else ip
        return Backend(f"{host}:{port}", max(1, weight), self.ext)

    async def _resolve_srv(self) -> list[Backend]:
        records, additionals = await self.client.lookup(self.name, TYPE_SRV)
        srvs = [r.value for r in records if isinstance(r.value, SrvRecord) and r.value.port]
        if not srvs:
            return []
        best = min(s.priority for s in srvs)
        srvs = [s for s in srvs if s.priority == best]
        # Kubernetes and Consul put the targets' addresses in the additional section.
        glue: dict[str, list[str]] = {}
        for rr in additionals:
            if rr.type in (TYPE_A, TYPE_AAAA) and isinstance(rr.value, str):
                glue.setdefault(rr.name, []).append(rr.value)
        out: list[Backend] = []
        for s in srvs:
            ips = self._usable(glue.get(s.target) or await self._target_ips(s.target))
            # SRV weight 0 means "rarely" (RFC 2782); 1 is the smallest weight we have.
            out.extend(self._backend(ip, s.port, max(1, s.weight)) for ip in ips)
        return out

    async def _target_ips(self, target: str) -> list[str]:
        if _is_ip(target):
            return [target]
        for qtype in (TYPE_A, TYPE_AAAA):
            try:
                records, _ = await self.client.lookup(target + ".", qtype)
            except DnsError:
                continue
            ips = [str(r.value) for r in records]
            if ips:
                return ips
        log.warning("SRV target %s of %s has no address; skipped", target, self.name)
        return []

    def __repr__(self) -> str:
        port = f":{self.port}" if self.port else ""
        return f"DnsDiscovery({self.kind} {self.name}{port} every {self.refresh_seconds:g}s)"


# IPv4 "this network" (RFC 1122 3.2.1.3: a source, never a destination). Linux connects
# 0.0.0.0 to the local host.
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")


def unroutable(ip: str) -> bool:
    """True for an address no backend can be reached at: unspecified (0.0.0.0, ::, and the
    rest of 0.0.0.0/8), multicast, IPv4's reserved 240.0.0.0/4 (255.255.255.255 included),
    or one of those mapped into IPv6. A sinkholing resolver answers 0.0.0.0 for names it
    blocks; connecting there reaches whatever listens on this host's port (this proxy's own
    listener: a request loop). Loopback and private addresses are kept (sidecars, test rigs).
    Unparsable text is unroutable too."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return True
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr.is_unspecified or addr.is_multicast:
        return True
    return isinstance(addr, ipaddress.IPv4Address) and (addr in _THIS_NETWORK
                                                         or addr.is_reserved)


def _is_ip(s: str) -> bool:
    try:
        ipaddress.ip_address(s)
        return True
    except ValueError:
        return False


DiscoveryLike = Union[StaticDiscovery, DnsDiscovery]
