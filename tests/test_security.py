from __future__ import annotations

import pytest

from app.errors import Unauthorized
from app.security import KeyRing, tenant_salt


def test_no_keys_means_no_auth() -> None:
    assert not KeyRing([]).enabled
    assert KeyRing([]).authenticate(None) is None


@pytest.mark.parametrize(
    "header", [None, "", "Bearer", "Bearer  ", "Basic abc", "Bearer wrong", "bearer k1x"]
)
def test_bad_or_missing_keys_are_refused(header: str | None) -> None:
    with pytest.raises(Unauthorized):
        KeyRing(["k1", "k2=acme"]).authenticate(header)


def test_keys_and_bound_tenants() -> None:
    ring = KeyRing(["k1", "k2=acme"])
    assert ring.authenticate("Bearer k1") is None
    assert ring.authenticate("bearer k2") == "acme"


def test_salt_is_secret_and_per_tenant() -> None:
    assert tenant_salt("s" * 16, "a") != tenant_salt("s" * 16, "b")
    assert tenant_salt("s" * 16, "a") != tenant_salt("t" * 16, "a")
    assert tenant_salt("s" * 16, "a") == tenant_salt("s" * 16, "a")
