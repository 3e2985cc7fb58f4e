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
