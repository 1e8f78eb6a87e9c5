from __future__ import annotations

import pytest

from app.tenancy import parse_networks, tenant_from

TRUSTED = parse_networks(["10.0.0.0/8", "127.0.0.1"])


@pytest.mark.parametrize(
    ("headers", "peer", "expected"),
    [
        (
            {"x-tenant-id": "acme", "x-user-id": "u1", "x-forwarded-for": "1.2.3.4"},
            "10.0.0.1",
            "acme",
        ),
        ({"x-user-id": "u1", "x-forwarded-for": "1.2.3.4"}, "10.0.0.1", "u1"),
        ({"x-forwarded-for": "1.2.3.4, 10.0.0.9"}, "10.0.0.1", "1.2.3.4"),
        # X-Forwarded-For from an untrusted peer is not believed.
        ({"x-forwarded-for": "1.2.3.4"}, "192.168.1.5", "192.168.1.5"),
        ({}, "192.168.1.5", "192.168.1.5"),
        ({"x-tenant-id": "   "}, "127.0.0.1", "127.0.0.1"),
        ({}, None, "unknown"),
    ],
)
def test_tenant_order(headers: dict[str, str], peer: str | None, expected: str) -> None:
    assert tenant_from(headers, peer, TRUSTED) == expected


def test_no_trusted_proxies_means_peer() -> None:
    assert tenant_from({"x-forwarded-for": "1.2.3.4"}, "10.0.0.1", ()) == "10.0.0.1"


def test_tenant_is_bounded() -> None:
    assert len(tenant_from({"x-tenant-id": "a" * 1000}, None, ())) == 256


def test_bad_cidr_is_named() -> None:
    with pytest.raises(ValueError, match="not-a-net"):
        parse_networks(["not-a-net"])
