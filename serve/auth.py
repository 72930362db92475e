"""Bearer API keys → tenants.

Keys are configured as SHA-256 digests. With no keys configured the API is open (the config
refuses that unless the server binds loopback) and every caller is the local operator.

Each tenant also gets its own **prefix-cache salt** (vLLM's ``cache_salt``, mixed into the hash of
a prompt's first KV block), so one tenant can neither reuse nor time another tenant's cached
prefixes: :meth:`Authenticator.cache_salt`.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
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
        self._salt_key = _salt_key(sorted(self._keys))

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

    def cache_salt(self, principal: Principal, requested: str | None = None) -> str:
        """The ``cache_salt`` every generation request of ``principal`` runs with.

        ``HMAC-SHA256(server secret, tenant [NUL client salt])`` as hex (64 characters: within
        vLLM's 128 and free of its forbidden ``@ / \\``). A client's own ``cache_salt`` still
        partitions its tenant's cache further, but is only ever mixed with the tenant, so no
        value a client sends can produce another tenant's salt.
        """
        message = principal.owner.encode()
        if requested:
            message += b"\0" + requested.encode()
        return hmac.new(self._salt_key, message, hashlib.sha256).hexdigest()


def _salt_key(digests: list[str]) -> bytes:
    """The server secret behind the salts.

    With keys: derived from every configured key digest (the same on every replica, so a
    tenant's requests share one cache whichever ingress they pass; unknown to any tenant, who
    knows only its own key; a key change re-keys the caches, which only costs cache hits).
    Open mode has one caller, the local operator: a random per-process secret.
    """
    if not digests:
        return secrets.token_bytes(32)
    return hashlib.sha256(b"ragtune cache_salt\0" + "\0".join(digests).encode()).digest()
