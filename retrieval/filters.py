"""Milvus boolean expressions built from untrusted pieces.

The server's tenant filter is always the left operand of a top-level ``and``; the client's
filter is wrapped in parentheses after checking that its brackets balance outside string
literals, so it cannot close our parenthesis and ``or`` its way past the tenant filter.
(Milvus Lite does not support expression templates, so values are quoted here instead.)
"""

from __future__ import annotations

from collections.abc import Iterable

from cluster.errors import InvalidRequestError

__all__ = ["MAX_FILTER_CHARS", "combine_filters", "eq", "in_list", "quote"]

MAX_FILTER_CHARS = 4096
_CLOSERS = {")": "(", "]": "["}


def quote(value: str) -> str:
    """A Milvus string literal for ``value`` (backslashes and double quotes escaped)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def eq(field: str, value: str) -> str:
    """``field == "value"`` with ``value`` quoted."""
    return f"{field} == {quote(value)}"


def in_list(field: str, values: Iterable[str]) -> str:
    """``field in ["a", "b"]`` with every value quoted."""
    return f"{field} in [{', '.join(quote(v) for v in values)}]"


def _check_brackets(expr: str) -> None:
    """Raise InvalidRequestError unless (), [] balance and nest outside quoted strings."""
    stack: list[str] = []
    in_quote: str | None = None
    escaped = False
    for pos, ch in enumerate(expr):
        if in_quote:
            # Milvus string literals use backslash escapes, as quote() writes them.
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == in_quote:
                in_quote = None
        elif ch in "\"'":
            in_quote = ch
        elif ch in "([":
            stack.append(ch)
        elif ch in _CLOSERS:
            opener = stack.pop() if stack else None
            if opener != _CLOSERS[ch]:
                raise InvalidRequestError(f"invalid filter: unbalanced {ch!r} at column {pos + 1}", param="filter")
    if in_quote:
        raise InvalidRequestError("invalid filter: unterminated string literal", param="filter")
    if stack:
        raise InvalidRequestError(f"invalid filter: unclosed {stack[-1]!r}", param="filter")


def combine_filters(server: str, client: str | None) -> str:
    """AND the server's filter with an optional client filter, never letting the client replace it.

    Args:
        server: The trusted expression (tenant scope); always applied.
        client: An untrusted Milvus expression from the request, or None/blank for none.

    Returns:
        ``server`` alone, or ``(client) and (server)`` — client first so that the column numbers
        in Milvus's parse errors point into the client's own text (shifted by one).

    Raises:
        InvalidRequestError: The client filter is too long or its brackets/quotes do not balance.
            Milvus's own parse errors surface later, at search time, with Milvus's reason.
    """
    if client is None:
        return server
    if not isinstance(client, str):
        raise InvalidRequestError("invalid filter: must be a string", param="filter")
    if not client.strip():
        return server
    if len(client) > MAX_FILTER_CHARS:
        raise InvalidRequestError(f"invalid filter: longer than {MAX_FILTER_CHARS} characters", param="filter")
    _check_brackets(client)
    return f"({client}) and ({server})"
