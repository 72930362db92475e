"""Bearer API keys → tenants.

Keys are configured as SHA-256 digests. With no keys configured the API is open (the config
refuses that unless the server binds loopback) and every caller is the local operator.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from cluster.errors import AuthenticationError
from serve.config import AuthConfig, hash_key

__all__ = ["Authenticator", "Principal"]


@dataclass(frozen=True)
class Principal:
    """Who is calling. ``scope`` is the tenant used for visibility (None = sees everything)."""

    tenant: str | None
    admin: bool

    @property
    def scope(self) -> str | None:
        return None if self.admin else self.tenant

    @property
    def owner(self) -> str:
        """The tenant that owns what this caller writes (collections); "local" in open mode."""
        return self.tenant or "local"


_OPERATOR = Principal(tenant=None, admin=True)


class Authenticator:
    """Maps an ``Authorization`` header to a :class:`Principal` or raises a 401."""

    def __init__(self, cfg: AuthConfig):
        self._keys = {k.sha256: Principal(k.tenant, k.admin) for k in cfg.keys}

    @property
    def open(self) -> bool:
        return not self._keys

    def authenticate(self, authorization: str | None) -> Principal:
        if self.open:
            return _OPERATOR
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationError("Missing API key: send 'Authorization: Bearer <key>'.", code="missing_api_key")
        digest = hash_key(token.strip())
        for known, principal in self._keys.items():
            if hmac.compare_digest(known, digest):
                return principal
        raise AuthenticationError("Incorrect API key provided.", code="invalid_api_key")
