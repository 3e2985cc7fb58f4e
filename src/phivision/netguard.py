"""Which network addresses phivision may fetch from: the one guard for ``prepare`` downloads and ``serve``'s
optional remote image URLs.

A URL is judged by the addresses its host resolves to (a name can point anywhere), and every redirect is judged
again. Link-local addresses (169.254.0.0/16, fe80::/10) are refused always: cloud metadata services live there
(169.254.169.254) and nothing a product catalog links to does. The other well-known metadata endpoints are refused
too. IPv6 addresses that carry an IPv4 address (mapped, NAT64, 6to4, Teredo) are judged by it. Every range that
is not public internet (private, shared address space 100.64.0.0/10, documentation, benchmarking, site-local...)
counts as private. Loopback and private networks are a policy choice of the caller (a local image server is normal for
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


# Special-purpose ranges (IANA registries) that no product image is served from, beyond what every Python's
# ``ipaddress`` flags: shared address space (carrier-grade NAT, also cloud-internal services), IETF protocol
# assignments, the retired 6to4 relay anycast, deprecated IPv6 site-local, NAT64 local use. They count as private.
NON_PUBLIC_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in ("100.64.0.0/10", "192.0.0.0/24", "192.88.99.0/24", "fec0::/10", "64:ff9b:1::/48")
)
NAT64 = ipaddress.ip_network("64:ff9b::/96")  # well-known prefix: the last 32 bits are an IPv4 address


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries to the network (mapped, NAT64, 6to4, Teredo client), or None:
    ``::ffff:169.254.169.254``, ``64:ff9b::a9fe:a9fe`` and ``2002:a9fe:a9fe::`` all reach 169.254.169.254."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    return None


def address_problem(address: str, policy: AddressPolicy = AddressPolicy()) -> str | None:
    """Why ``address`` (an IP literal) may not be fetched, as a report key, or None when it may. An IPv6 address
    that carries an IPv4 one is judged by the IPv4 address it reaches."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(ip, ipaddress.IPv6Address):
        ip = embedded_ipv4(ip) or ip
    if ip in METADATA_ADDRESSES or ip.is_link_local:
        return "blocked_link_local"
    if ip.is_loopback:  # before is_reserved: ::1 lies in the reserved ::/8
        return None if policy.allow_loopback else "blocked_loopback"
    if ip.is_unspecified or ip.is_multicast or ip.is_reserved:
        return "blocked_address"
    special = ip.is_private or not ip.is_global or any(ip in net for net in NON_PUBLIC_NETWORKS)
    if special and not policy.allow_private:
        return "blocked_private"
    return None


def resolve_checked(host: str, port: int, policy: AddressPolicy = AddressPolicy()) -> list[str]:
    """The addresses ``host`` resolves to, all of them allowed by ``policy``; raises :class:`BlockedAddress`
    when any is not (one bad record is enough to refuse: the resolver may hand either to the connection)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError) as err:
        raise BlockedAddress("dns_error", f"{host}: {err}") from None
    return _checked(host, infos, policy)


async def resolve_checked_async(host: str, port: int, policy: AddressPolicy = AddressPolicy()) -> list[str]:
    """:func:`resolve_checked` on the event loop's resolver (no worker thread of the caller's is held)."""
    import asyncio

    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError) as err:
        raise BlockedAddress("dns_error", f"{host}: {err}") from None
    return _checked(host, infos, policy)


def _checked(host: str, infos: list, policy: AddressPolicy) -> list[str]:
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    for address in addresses:
        problem = address_problem(address, policy)
        if problem:
            raise BlockedAddress(problem, f"{host} resolves to {address}")
    return addresses


# ------------------------------------------------------------------------------- pinned connections (httpx)
# Checking a URL's host and then letting the HTTP client resolve it again leaves a gap: a name can resolve to a
# public address for the check and to 169.254.169.254 for the connection (DNS rebinding). These backends close
# it: every connection the client opens (the first request, every redirect, every retry) resolves the host once,
# checks every address, and connects to a checked address. TLS still verifies the certificate against the host
# name (httpcore sends the original name as SNI). Proxies from the environment are not used by clients built on
# these transports: a proxy would make the connection for us, unchecked.


class GuardedAsyncBackend:
    """An ``httpcore`` async network backend that connects only to addresses ``policy`` allows."""

    def __init__(self, policy: AddressPolicy, inner=None) -> None:
        import httpcore

        self.policy = policy
        self.inner = inner if inner is not None else httpcore.AnyIOBackend()

    async def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        import httpcore

        addresses = await resolve_checked_async(host, port, self.policy)
        error: Exception | None = None
        for address in addresses:  # getaddrinfo's order; every one was checked
            try:
                return await self.inner.connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as err:
                error = err
        raise error if error is not None else httpcore.ConnectError(f"{host}: no address")

    async def connect_unix_socket(self, path, timeout=None, socket_options=None):
        raise BlockedAddress("blocked_address", f"unix socket {path}")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


class GuardedSyncBackend:
    """The blocking twin of :class:`GuardedAsyncBackend`, for ``httpx.Client``."""

    def __init__(self, policy: AddressPolicy, inner=None) -> None:
        import httpcore

        self.policy = policy
        self.inner = inner if inner is not None else httpcore.SyncBackend()

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        import httpcore

        error: Exception | None = None
        for address in resolve_checked(host, port, self.policy):
            try:
                return self.inner.connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as err:
                error = err
        raise error if error is not None else httpcore.ConnectError(f"{host}: no address")

    def connect_unix_socket(self, path, timeout=None, socket_options=None):
        raise BlockedAddress("blocked_address", f"unix socket {path}")

    def sleep(self, seconds: float) -> None:
        self.inner.sleep(seconds)


def guarded_async_transport(policy: AddressPolicy = AddressPolicy(), **kwargs):
    """An ``httpx.AsyncHTTPTransport`` (``kwargs`` as for it: ``verify``, ``limits``...) whose connections go only
    to addresses ``policy`` allows; a refused address raises :class:`BlockedAddress` from the request."""
    import httpx

    transport = httpx.AsyncHTTPTransport(**kwargs)
    _pin(transport, GuardedAsyncBackend(policy))
    return transport


def guarded_transport(policy: AddressPolicy = AddressPolicy(), **kwargs):
    """The blocking twin of :func:`guarded_async_transport`, for ``httpx.Client``."""
    import httpx

    transport = httpx.HTTPTransport(**kwargs)
    _pin(transport, GuardedSyncBackend(policy))
    return transport


def _pin(transport, backend) -> None:
    # httpx builds its httpcore pool without a way to pass a network backend; set the pool's backend, and fail
    # loudly (never silently unguarded) if a new httpx/httpcore moved it.
    pool = getattr(transport, "_pool", None)
    if pool is None or not hasattr(pool, "_network_backend"):
        raise RuntimeError("this httpx/httpcore version has no pool network backend to guard")
    pool._network_backend = backend
