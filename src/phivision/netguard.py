"""Which network addresses phivision may fetch from: the one guard for ``prepare`` downloads and ``serve``'s
optional remote image URLs.

A URL is judged by the addresses its host resolves to (a name can point anywhere), and every redirect is judged
again. Link-local addresses (169.254.0.0/16, fe80::/10) are refused always: cloud metadata services live there
(169.254.169.254) and nothing a product catalog links to does. The other well-known metadata endpoints are refused
too. Loopback and private networks are a policy choice of the caller (a local image server is normal for
``prepare``, dangerous for a public ``serve``).
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

# Metadata services outside link-local space: AWS over IPv6, Alibaba Cloud, Oracle Cloud's IPv4 alias.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("fd00:ec2::254", "100.100.100.200", "192.0.0.192")
)


class BlockedAddress(Exception):
    """A host that resolves to an address the policy refuses; ``reason`` is a short report key."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class AddressPolicy:
    """What may be fetched besides the public internet."""

    allow_loopback: bool = True
    allow_private: bool = True


def address_problem(address: str, policy: AddressPolicy = AddressPolicy()) -> str | None:
    """Why ``address`` (an IP literal) may not be fetched, as a report key, or None when it may."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:169.254.169.254 is 169.254.169.254
    if ip in METADATA_ADDRESSES or ip.is_link_local:
        return "blocked_link_local"
    if ip.is_loopback:  # before is_reserved: ::1 lies in the reserved ::/8
        return None if policy.allow_loopback else "blocked_loopback"
    if ip.is_unspecified or ip.is_multicast or ip.is_reserved:
        return "blocked_address"
    if ip.is_private and not policy.allow_private:
        return "blocked_private"
    return None


def resolve_checked(host: str, port: int, policy: AddressPolicy = AddressPolicy()) -> list[str]:
    """The addresses ``host`` resolves to, all of them allowed by ``policy``; raises :class:`BlockedAddress`
    when any is not (one bad record is enough to refuse: the resolver may hand either to the connection)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError) as err:
        raise BlockedAddress("dns_error", f"{host}: {err}") from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    for address in addresses:
        problem = address_problem(address, policy)
        if problem:
            raise BlockedAddress(problem, f"{host} resolves to {address}")
    return addresses
