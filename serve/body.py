"""Request bodies that are client input, never a 5xx: UTF-8, JSON, numbers, depth, surrogates.

``json.loads`` alone turns several hostile bodies into server errors (a 5,000-digit integer
raises ``ValueError``, deep nesting ``RecursionError``, ``"\\ud800"`` decodes to a lone surrogate
that breaks the tokenizer later). These checks make each a 400 that says what is wrong.
"""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi import Request

from cluster.errors import InvalidRequestError

__all__ = ["check_json_body", "parse_json"]

_MAX_DEPTH = 64
# A \uD800-\uDFFF escape: only then can a lone surrogate appear (raw ones are invalid UTF-8).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _depth_ok(raw: bytes) -> bool:
    """Bracket nesting ≤ ``_MAX_DEPTH`` outside strings (a linear scan, before any recursion)."""
    if raw.count(b"[") + raw.count(b"{") <= _MAX_DEPTH:  # C-speed shortcut for nearly every body
        return True
    depth, in_string, escaped = 0, False, False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            if depth > _MAX_DEPTH:
                return False
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return True


def _no_lone_surrogates(value: Any) -> None:
    if isinstance(value, str):
        value.encode("utf-8")  # raises UnicodeEncodeError on a lone surrogate
    elif isinstance(value, dict):
        for key, item in value.items():
            _no_lone_surrogates(key)
            _no_lone_surrogates(item)
    elif isinstance(value, list):
        for item in value:
            _no_lone_surrogates(item)


def parse_json(raw: bytes) -> Any:
    """The JSON value of ``raw``, or an ``InvalidRequestError`` that says why not."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(f"Request body is not valid UTF-8 (byte {exc.start}).", code="invalid_utf8") from None
    if not _depth_ok(raw):
        raise InvalidRequestError(f"Request body nests deeper than {_MAX_DEPTH} levels.", code="invalid_json")
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, int digit limit
        raise InvalidRequestError(f"Request body is not valid JSON: {exc}", code="invalid_json") from None
    if _SURROGATE_ESCAPE.search(raw):
        try:
            _no_lone_surrogates(value)
        except UnicodeEncodeError:
            raise InvalidRequestError("Request body contains a lone UTF-16 surrogate (\\ud800-\\udfff).",
                                      code="invalid_json") from None
    return value


async def check_json_body(request: Request) -> None:
    """FastAPI dependency for routes whose body FastAPI parses: reject hostile bodies first."""
    raw = await request.body()  # Starlette caches it, so the route's own parse reads it again
    if raw:
        parse_json(raw)
