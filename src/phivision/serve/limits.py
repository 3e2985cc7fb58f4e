"""Where one ``phivision serve`` process listens and which names it answers to (its limits are
:class:`phivision.args.ServeLimits`). Kept free of heavy imports so that every flag is checked before a model loads.
"""

from __future__ import annotations

import ipaddress
import socket

from phivision.args import ServeArgs
from phivision.errors import PhivisionError
from phivision.options import check_option

# Names a browser sends as Host for a server bound to loopback. Anything else reaching a loopback-only server
# came through a DNS name that points at 127.0.0.1 (DNS rebinding) and is refused.
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a bind address) only accepts connections from this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(bind_host: str, extra: tuple[str, ...] | list[str] = ()) -> frozenset[str] | None:
    """Host header names the server answers: loopback names when bound to loopback, plus ``extra``; None (any
    name) when bound elsewhere without ``extra``."""
    names = {name.lower().strip("[]") for name in extra}
    if is_loopback(bind_host):
        names |= LOOPBACK_HOSTS | {bind_host.lower().strip("[]")}
    return frozenset(names) or None


def check_bind(host: str, port: int) -> None:
    """Fail with the flag's name, before a model is loaded, when ``host:port`` cannot be listened on."""
    check_option(ServeArgs, "port", port)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as err:
        raise PhivisionError(f"--host {host!r}: not an address of this machine ({err})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            sock.bind(address)
        except OSError as err:
            reason = err.strerror or str(err)
            raise PhivisionError(f"--host {host} --port {port}: cannot listen there ({reason})") from None
