"""Load balancing, health checks and service discovery (Pingora's pingora-load-balancing).

    from pyngora.lb import LoadBalancer, RoundRobin, Backend, TcpHealthCheck
    lb = LoadBalancer.try_from_iter(["10.0.0.1:80", "10.0.0.2:80"])
    backend = lb.select(b"", 256)

In a pre-fork server one `HealthService` (a background process) runs discovery and the checks
of every group and writes the shared `HealthTable`; each worker's LoadBalancer reads it with
``attach_health_table``. See health_table.py for the file layout.
"""
from pyngora.lb.backend import Backend, Backends, parse_addr
from pyngora.lb.balancer import LoadBalancer
from pyngora.lb.discovery import DnsDiscovery, StaticDiscovery
from pyngora.lb.dns import DnsClient, DnsError, DnsTimeout
from pyngora.lb.health import (Health, HealthCheck, HealthCheckError, HealthGroup,
                               HealthService, HttpHealthCheck, TcpHealthCheck, make_health_check)
from pyngora.lb.health_table import HealthTable, health_key
from pyngora.lb.selection import (SELECTIONS, Consistent, FnvHash, HashKey, Random, RoundRobin,
                                  fnv1a64)

__all__ = [
    "Backend", "Backends", "parse_addr", "LoadBalancer", "DnsDiscovery", "StaticDiscovery",
    "DnsClient", "DnsError", "DnsTimeout", "Health", "HealthCheck", "HealthCheckError",
    "HealthGroup", "HealthService", "HttpHealthCheck", "TcpHealthCheck", "make_health_check",
    "HealthTable", "health_key", "SELECTIONS", "Consistent", "FnvHash", "HashKey", "Random",
    "RoundRobin", "fnv1a64",
]
