"""The one address guard: link-local and metadata always refused, loopback/private by policy."""

import pytest

from phivision.netguard import AddressPolicy, BlockedAddress, address_problem, resolve_checked

STRICT = AddressPolicy(allow_loopback=False, allow_private=False)


@pytest.mark.parametrize(
    ("address", "default", "strict"),
    [
        ("169.254.169.254", "blocked_link_local", "blocked_link_local"),
        ("::ffff:169.254.169.254", "blocked_link_local", "blocked_link_local"),
        ("fe80::1%eth0", "blocked_link_local", "blocked_link_local"),
        ("fd00:ec2::254", "blocked_link_local", "blocked_link_local"),
        ("100.100.100.200", "blocked_link_local", "blocked_link_local"),
        ("0.0.0.0", "blocked_address", "blocked_address"),
        ("224.0.0.1", "blocked_address", "blocked_address"),
        ("127.0.0.1", None, "blocked_loopback"),
        ("::1", None, "blocked_loopback"),
        ("10.1.2.3", None, "blocked_private"),
        ("192.168.0.7", None, "blocked_private"),
        ("93.184.216.34", None, None),
        ("2606:2800:220:1::1", None, None),
        # shared address space (carrier-grade NAT, cloud-internal services) and other special ranges
        ("100.64.0.1", None, "blocked_private"),
        ("::ffff:100.64.0.1", None, "blocked_private"),
        ("100.127.255.254", None, "blocked_private"),
        ("192.0.0.8", None, "blocked_private"),
        ("192.88.99.1", None, "blocked_private"),
        ("198.18.0.1", None, "blocked_private"),
        ("fec0::1", None, "blocked_private"),
        ("240.0.0.1", "blocked_address", "blocked_address"),
        # IPv6 addresses that carry an IPv4 one are judged by it: NAT64, 6to4, Teredo
        ("64:ff9b::a9fe:a9fe", "blocked_link_local", "blocked_link_local"),
        ("64:ff9b::7f00:1", None, "blocked_loopback"),
        ("64:ff9b::808:808", None, None),
        ("2002:a9fe:a9fe::1", "blocked_link_local", "blocked_link_local"),
        ("2002:a00:1::1", None, "blocked_private"),
        ("2001:0:4136:e378:8000:63bf:5601:5456", "blocked_link_local", "blocked_link_local"),
    ],
)
def test_address_policy(address, default, strict):
    assert address_problem(address) == default
    assert address_problem(address, STRICT) == strict


def test_resolve_checked_refuses_a_name_that_points_at_loopback_when_strict():
    assert "127.0.0.1" in resolve_checked("localhost", 80) or "::1" in resolve_checked("localhost", 80)
    with pytest.raises(BlockedAddress) as err:
        resolve_checked("localhost", 80, STRICT)
    assert err.value.reason == "blocked_loopback"


def test_resolve_checked_reports_an_unresolvable_name():
    with pytest.raises(BlockedAddress) as err:
        resolve_checked("no-such-host.invalid", 80)
    assert err.value.reason == "dns_error"


# ------------------------------------------------------------------------- pinned transports, for real


@pytest.fixture
def loopback_server():
    """A loopback HTTP server: ``/ok`` answers 200, ``/meta`` redirects to the metadata address."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    hits = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            hits.append(self.path)
            if self.path == "/meta":
                self.send_response(302)
                self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://localhost:{httpd.server_address[1]}", hits
    httpd.shutdown()
    httpd.server_close()


def test_guarded_transports_check_every_connection(loopback_server):
    import asyncio

    import httpx

    from phivision.netguard import guarded_async_transport, guarded_transport

    base, hits = loopback_server
    with httpx.Client(transport=guarded_transport(), follow_redirects=True) as client:
        assert client.get(f"{base}/ok").text == "ok"
        with pytest.raises(BlockedAddress) as err:
            client.get(f"{base}/meta")  # the redirect's new connection is checked too
        assert err.value.reason == "blocked_link_local"
    with httpx.Client(transport=guarded_transport(STRICT)) as client, pytest.raises(BlockedAddress) as err:
        client.get(f"{base}/ok")  # "localhost" resolves to loopback, which the strict policy refuses
    assert err.value.reason == "blocked_loopback"

    async def fetch(url: str) -> str:
        async with httpx.AsyncClient(transport=guarded_async_transport(), follow_redirects=True) as client:
            return (await client.get(url)).text

    assert asyncio.run(fetch(f"{base}/ok")) == "ok"
    with pytest.raises(BlockedAddress):
        asyncio.run(fetch(f"{base}/meta"))
    assert hits == ["/ok", "/meta", "/ok", "/meta"]  # the strict client never connected


def test_a_rebinding_name_is_resolved_once_and_the_connection_pinned(loopback_server, monkeypatch):
    """A hostile DNS answers loopback to the check and the metadata address afterwards: the connection goes
    to the address that was checked, because nothing resolves the name a second time."""
    import socket

    import httpx

    from phivision.netguard import guarded_transport

    base, hits = loopback_server
    port = int(base.rsplit(":", 1)[1])
    real = socket.getaddrinfo
    answers = []

    def rebinding(host, *args, **kwargs):
        if host != "rebind.test":
            return real(host, *args, **kwargs)
        address = "127.0.0.1" if not answers else "169.254.169.254"
        answers.append(address)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    with httpx.Client(transport=guarded_transport()) as client:
        assert client.get(f"http://rebind.test:{port}/ok").text == "ok"
    assert answers == ["127.0.0.1"] and hits == ["/ok"]
    with pytest.raises(BlockedAddress) as err:
        resolve_checked("rebind.test", port)  # the second answer would have been refused
    assert err.value.reason == "blocked_link_local"
