"""Client authentication and tenant isolation (pure).

`KeyRing` checks `Authorization: Bearer KEY` against `ROUTER_API_KEYS` in constant time per key
(digests compared with `hmac.compare_digest`, every key checked); a key written `KEY=TENANT` binds
its holder to that tenant, whatever headers it sends. `tenant_salt` derives vLLM's `cache_salt`
from a secret, so one tenant can neither share nor guess another's salt.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass

from app.errors import Unauthorized


@dataclass(frozen=True, slots=True)
class _Entry:
    digest: bytes
    tenant: str | None


class KeyRing:
    def __init__(self, specs: Iterable[str]) -> None:
        entries = []
        for spec in specs:
            key, _, tenant = spec.partition("=")
            if key:
                entries.append(_Entry(hashlib.sha256(key.encode()).digest(), tenant or None))
        self._entries = tuple(entries)

    @property
    def enabled(self) -> bool:
        return bool(self._entries)

    def authenticate(self, authorization: str | None) -> str | None:
        """The tenant bound to the presented key (None when unbound); Unauthorized otherwise."""
        if not self._entries:
            return None
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        digest = hashlib.sha256(token.strip().encode()).digest()
        found: _Entry | None = None
        for entry in self._entries:  # no early exit: the time does not tell which key matched
            if hmac.compare_digest(entry.digest, digest):
                found = entry
        if found is None:
            raise Unauthorized("invalid API key")
        return found.tenant


def tenant_salt(secret: str, tenant: str) -> str:
    return hmac.new(secret.encode(), tenant.encode(), hashlib.sha256).hexdigest()[:32]


class AdminKey:
    """`ADMIN_API_KEY`: the one key of the admin API, compared in constant time. Client keys
    (`KeyRing`) never grant it."""

    def __init__(self, key: str) -> None:
        self._digest = hashlib.sha256(key.encode()).digest() if key else None

    @property
    def enabled(self) -> bool:
        return self._digest is not None

    def check(self, authorization: str | None) -> None:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("missing admin key: send 'Authorization: Bearer <ADMIN_API_KEY>'")
        digest = hashlib.sha256(token.strip().encode()).digest()
        if self._digest is None or not hmac.compare_digest(self._digest, digest):
            raise Unauthorized("invalid admin key")
