"""Loopback-only Host and Origin in open (no-keys) mode: a DNS-rebinding page cannot drive the API.

Without API keys the server is open and bound to loopback (the config refuses anything else), so
anyone who can reach 127.0.0.1 is the operator. A web page can still reach it through the
browser: it rebinds its own name to 127.0.0.1, and its scripts then call the admin API
"same-origin". Such requests carry the attacker's name in ``Host`` (and ``Origin``, when sent)
— never a loopback one, since the browser only knows the page's name. So in open mode:

* ``Host`` must be ``localhost``, ``127.x.y.z`` or ``[::1]`` (optional ``:port``), else 403;
* an ``Origin``, if present, must be ``http(s)://`` one of those, else 403 (``Origin: null``
  from sandboxed frames and files too).

With keys configured the middleware passes everything through: keys are the protection there.
"""

from __future__ import annotations

import ipaddress
import re

from starlette.responses import JSONResponse

__all__ = ["LoopbackHostGuard", "is_loopback_host", "is_loopback_origin"]

_PORT = re.compile(r"\d{1,5}\Z")
_ORIGIN = re.compile(r"(?i)https?://(?P<host>[^/?#]+)\Z")


def _loopback_name(name: str) -> bool:
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def is_loopback_host(host: str) -> bool:
    """True for ``localhost``, a loopback IPv4 or ``[::1]``, each with an optional ``:port``."""
    if host.startswith("["):  # [v6] or [v6]:port
        inside, bracket, rest = host[1:].partition("]")
        return bool(bracket) and (rest == "" or rest[:1] == ":" and _PORT.match(rest[1:]) is not None) \
            and ":" in inside and _loopback_name(inside)
    if host.count(":") > 1:  # a bare IPv6 address cannot carry a port
        return _loopback_name(host)
    name, colon, port = host.partition(":")
    return (not colon or _PORT.match(port) is not None) and _loopback_name(name)


def is_loopback_origin(origin: str) -> bool:
    """True for ``http://`` or ``https://`` + a loopback host (no path), as browsers send ``Origin``."""
    match = _ORIGIN.match(origin)
    return match is not None and is_loopback_host(match["host"])


def _forbidden(message: str, code: str) -> JSONResponse:
    body = {"error": {"message": message, "type": "permission_error", "param": None, "code": code}}
    return JSONResponse(body, status_code=403)


def _shown(value: str) -> str:
    return repr(value if len(value) <= 80 else value[:80] + "…")


class LoopbackHostGuard:
    """ASGI middleware: in open mode (``enabled``), 403 unless Host and Origin are loopback."""

    def __init__(self, app, enabled: bool):
        self.app, self.enabled = app, enabled

    async def __call__(self, scope, receive, send):
        if not self.enabled or scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        response = self._check(scope.get("headers") or [])
        if response is None:
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":  # nothing routes websockets today; close instead of answering HTTP
            return await send({"type": "websocket.close", "code": 1008})
        await response(scope, receive, send)

    @staticmethod
    def _check(headers) -> JSONResponse | None:
        """The 403 for these request headers, or None; every Host and Origin header must pass."""
        hosts = [v.decode("latin-1") for k, v in headers if k.lower() == b"host"] or [""]
        origins = [v.decode("latin-1") for k, v in headers if k.lower() == b"origin"]
        for host in hosts:
            if not is_loopback_host(host):
                return _forbidden(f"Host {_shown(host)} is not a loopback name: this server has no API keys and "
                                  "answers only requests addressed to localhost, 127.0.0.1 or [::1] "
                                  "(configure serve.auth.keys to serve other names).", "host_not_allowed")
        for origin in origins:
            if not is_loopback_origin(origin):
                return _forbidden(f"Origin {_shown(origin)} is not a loopback http(s) origin: this server has no "
                                  "API keys and refuses cross-site browser requests.", "origin_not_allowed")
        return None
