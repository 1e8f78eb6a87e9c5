"""Who is asking: the tenant a request belongs to (pure).

Order: `X-Tenant-ID`, then `X-User-ID`, then the first address of `X-Forwarded-For` (believed only
when the direct peer is a trusted proxy), then the peer address itself. When the tenant isolates
or limits (cache salt, per-tenant rates or limits), the two tenant headers are believed only from
a trusted proxy too, unless the operator says otherwise (`TRUST_TENANT_HEADERS`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_TENANT_CHARS = 256
UNKNOWN_PEER = "unknown"


def parse_networks(cidrs: Iterable[str]) -> tuple[Network, ...]:
    """Parse `TRUSTED_PROXIES` entries (CIDRs or single addresses); ValueError names the bad one."""
    networks = []
    for cidr in cidrs:
        try:
            networks.append(ipaddress.ip_network(cidr.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{cidr!r} is not an IP address or CIDR such as 10.0.0.0/8") from None
    return tuple(networks)


def is_trusted(peer: str | None, trusted: Sequence[Network]) -> bool:
    if not peer or not trusted:
        return False
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return any(address in network for network in trusted)


def tenant_from(
    headers: Mapping[str, str],
    peer: str | None,
    trusted: Sequence[Network],
    *,
    headers_from_anyone: bool = True,
) -> str:
    """The tenant of a request. `headers` must look up names case-insensitively (or lower-case).

    Where the tenant is a security boundary (`headers_from_anyone=False`), X-Tenant-ID and
    X-User-ID count only from a trusted proxy; X-Forwarded-For always does."""
    proxied = is_trusted(peer, trusted)
    if headers_from_anyone or proxied:
        for name in ("x-tenant-id", "x-user-id"):
            value = headers.get(name, "").strip()
            if value:
                return value[:MAX_TENANT_CHARS]
    forwarded = headers.get("x-forwarded-for", "")
    if forwarded and proxied:
        first = forwarded.split(",", 1)[0].strip()
        if first:
            return first[:MAX_TENANT_CHARS]
    return peer or UNKNOWN_PEER
