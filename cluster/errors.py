"""Typed errors shared by every component.

Each carries the HTTP status and the OpenAI error ``type``/``param``/``code`` it maps to, so the
ingress turns any of them into an OpenAI-shaped response without knowing where it came from.
They pickle cleanly, so they survive a hop across Ray actors.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "ConfigError",
    "InvalidRequestError",
    "NotFoundError",
    "OverloadedError",
    "PermissionDeniedError",
    "RagtuneError",
]


class RagtuneError(Exception):
    """Base error: ``status`` is the HTTP status; ``type``/``param``/``code`` are OpenAI fields."""

    status: int = 500
    type: str = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def __reduce__(self):
        return (_rebuild, (type(self), self.message, self.param, self.code))

    def to_dict(self) -> dict:
        """The OpenAI error body: ``{"error": {"message", "type", "param", "code"}}``."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _rebuild(cls, message, param, code):
    return cls(message, param=param, code=code)


class InvalidRequestError(RagtuneError):
    """Malformed or unacceptable input (400)."""

    status = 400
    type = "invalid_request_error"


class PermissionDeniedError(InvalidRequestError):
    """The caller may see the object but not change it (403): shared adapters, public collections.

    A refused request like any 400 (callers that catch InvalidRequestError keep working); only
    the status and type differ.
    """

    status = 403
    type = "permission_error"


class AuthenticationError(RagtuneError):
    """Missing or bad API key (401)."""

    status = 401
    type = "authentication_error"


class NotFoundError(RagtuneError):
    """Unknown model, adapter, collection or document (404) — also for another tenant's objects."""

    status = 404
    type = "not_found_error"


class OverloadedError(RagtuneError):
    """Too many requests in flight (429) or the queue is full (503); ``retry_after`` in seconds."""

    status = 429
    type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after: int = 1, status: int = 429, **kw):
        super().__init__(message, **kw)
        self.retry_after = retry_after
        self.status = status

    def __reduce__(self):
        return (_rebuild_overloaded, (self.message, self.retry_after, self.status, self.param, self.code))


def _rebuild_overloaded(message, retry_after, status, param, code):
    return OverloadedError(message, retry_after=retry_after, status=status, param=param, code=code)


class ConfigError(RagtuneError):
    """A config value is invalid; the message names the field and says why."""

    status = 400
    type = "config_error"
