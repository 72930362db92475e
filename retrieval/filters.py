"""Client filters: a small allow-listed grammar, parsed to an AST and re-emitted as a Milvus expression.

A client never sends Milvus syntax through. Its ``filter`` is parsed here; only this grammar is
accepted, and the Milvus expression is emitted from the tree (every literal quoted by us)::

    expr       := or
    or         := and ("or" and)*
    and        := unary ("and" unary)*
    unary      := "not" unary | "(" expr ")" | comparison
    comparison := field ("==" | "!=" | "<" | "<=" | ">" | ">=") literal
                | field ["not"] "in" "[" literal ("," literal)* "]"
                | field "like" string
    field      := "document" | "doc_id" | "source" | "chunk_index" | "metadata" "[" string "]"
    literal    := string | number | "true" | "false"

Bounds: nesting depth, node count, ``in`` list length, literal length, at most two ``%`` in a
``like`` pattern, ``like`` never on ``text``, and never in an expression that also reads a
``metadata[...]`` path: milvus-lite 3.2 evaluates any JSON-path expression row by row in Python,
turning ``like`` into a backtracking regex (measured: ``metadata["k"] == "x" and source like
"%a%b%"`` took 1.5 s over 1,000 rows with 2,000-character sources and 6.7 s over 4,000, while
``source like "%a%b%"`` alone took 5 ms / 20 ms on its vectorised path). The server's tenant
scope is ANDed after parsing (:func:`combine_filters`); a client filter can only narrow it.

Why a hand-written parser: pymilvus sends the expression string to the server verbatim (Milvus's
grammar, ``Plan.g4``, lives in the Go server and is not exposed for validation), and milvus-lite's
own parser (``milvus_lite.search.filter``) is a private module of the embedded engine only,
accepts its whole dialect (arithmetic, JSON/array functions, ``text_match``, ``like`` anywhere),
and is not the grammar a production Milvus runs. Allow-listing its tree would still mean walking
it; this subset is smaller than that dependency.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

from cluster.errors import InvalidRequestError

__all__ = [
    "MAX_FILTER_CHARS",
    "MAX_FILTER_DEPTH",
    "MAX_FILTER_NODES",
    "MAX_IN_VALUES",
    "MAX_LIKE_WILDCARDS",
    "MAX_LITERAL_CHARS",
    "client_filter",
    "combine_filters",
    "eq",
    "in_list",
    "parse_filter",
    "quote",
]

MAX_FILTER_CHARS = 4096
MAX_FILTER_DEPTH = 8  # nested parentheses / `not`
MAX_FILTER_NODES = 64  # comparisons + and/or/not
MAX_IN_VALUES = 100
MAX_LIKE_WILDCARDS = 2  # `%` per pattern: n wildcards cost O(len^n) in a backtracking matcher
MAX_LITERAL_CHARS = 1024

# Client name → stored column. `document` is what responses call the document id.
_COLUMNS = {"document": "doc_id", "doc_id": "doc_id", "source": "source", "chunk_index": "chunk_index"}
_UNFILTERABLE = {"text", "tenant", "id", "content_hash", "dense", "sparse"}
_ALLOWED = 'document, source, chunk_index, metadata["key"]'
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}\Z")
_KEYWORDS = {"and", "or", "not", "in", "like", "true", "false"}
_ESCAPES = {"\\": "\\", '"': '"', "'": "'"}
_TOKEN = re.compile(
    r"(?P<ws>\s+)|(?P<num>-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)|(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<op>==|!=|<=|>=|<|>)|(?P<punct>[()\[\],])|(?P<quote>[\"'])"
)


def quote(value: str) -> str:
    """A Milvus string literal for ``value`` (backslashes and double quotes escaped)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def eq(field: str, value: str) -> str:
    """``field == "value"`` with ``value`` quoted."""
    return f"{field} == {quote(value)}"


def in_list(field: str, values: Iterable[str]) -> str:
    """``field in ["a", "b"]`` with every value quoted."""
    return f"{field} in [{', '.join(quote(v) for v in values)}]"


def _error(what: str, col: int | None = None) -> InvalidRequestError:
    where = f" at column {col}" if col is not None else ""
    return InvalidRequestError(f"invalid filter{where}: {what}", param="filter")


def _show(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:40] + "…")


# ---- tokens ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Tok:
    kind: str  # num | name | op | punct | str | end
    text: str  # as written; the decoded value for strings
    col: int  # 1-based

    @property
    def shown(self) -> str:
        return _show(quote(self.text) if self.kind == "str" else self.text)


def _tokenize(src: str) -> list[_Tok]:
    tokens, pos = [], 0
    while pos < len(src):
        m = _TOKEN.match(src, pos)
        if m is None:
            raise _error(f"unexpected character {_show(src[pos])}", pos + 1)
        kind = m.lastgroup
        if kind == "quote":
            tok, pos = _string(src, pos)
            tokens.append(tok)
            continue
        if kind != "ws":
            tokens.append(_Tok(kind, m.group(), pos + 1))
        pos = m.end()
    tokens.append(_Tok("end", "end of filter", len(src) + 1))
    return tokens


def _string(src: str, start: int) -> tuple[_Tok, int]:
    """Decode the string literal at ``start``; only \\\\ \\" \\' escapes, no control characters."""
    delim, out, pos = src[start], [], start + 1
    while pos < len(src):
        ch = src[pos]
        if ch == delim:
            if len(out) > MAX_LITERAL_CHARS:
                raise _error(f"string literal longer than {MAX_LITERAL_CHARS} characters", start + 1)
            return _Tok("str", "".join(out), start + 1), pos + 1
        if ch == "\\":
            esc = src[pos + 1:pos + 2]
            if esc not in _ESCAPES:
                raise _error(f"unsupported escape {_show(ch + esc)} (only \\\\ \\\" \\')", pos + 1)
            out.append(_ESCAPES[esc])
            pos += 2
            continue
        if ord(ch) < 0x20 or ord(ch) == 0x7F:
            raise _error("control character in string literal", pos + 1)
        out.append(ch)
        pos += 1
    raise _error("unterminated string literal", start + 1)


# ---- tree ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    column: str  # stored column: doc_id | source | chunk_index | metadata
    key: str | None = None  # metadata key

    def emit(self) -> str:
        return f"metadata[{quote(self.key)}]" if self.key is not None else self.column


Value = str | int | float | bool


def _literal(value: Value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return quote(value)
    return repr(value)


@dataclass(frozen=True)
class Compare:
    field: Field
    op: str
    value: Value

    def emit(self) -> str:
        return f"{self.field.emit()} {self.op} {_literal(self.value)}"


@dataclass(frozen=True)
class In:
    field: Field
    values: tuple[Value, ...]
    negate: bool = False

    def emit(self) -> str:
        if self.field.key is not None:
            # milvus-lite 3.2 refuses `in` on a JSON path ("left side of 'in' must be a field
            # reference"): spell it as equalities, which every Milvus evaluates alike.
            name = self.field.emit()
            any_of = " or ".join(f"{name} == {_literal(v)}" for v in self.values)
            return f"not ({any_of})" if self.negate else f"({any_of})"
        op = "not in" if self.negate else "in"
        return f"{self.field.emit()} {op} [{', '.join(_literal(v) for v in self.values)}]"


@dataclass(frozen=True)
class Like:
    field: Field
    pattern: str
    col: int  # of the `like` keyword, for the JSON-path check

    def emit(self) -> str:
        return f"{self.field.emit()} like {quote(self.pattern)}"


@dataclass(frozen=True)
class Not:
    operand: Node

    def emit(self) -> str:
        # Milvus's `not` binds tighter than comparisons: always parenthesise its operand.
        return f"not ({self.operand.emit()})"


@dataclass(frozen=True)
class BoolOp:
    op: str  # and | or
    operands: tuple[Node, ...]

    def emit(self) -> str:
        parts = [f"({o.emit()})" if self.op == "and" and isinstance(o, BoolOp) and o.op == "or" else o.emit()
                 for o in self.operands]
        return f" {self.op} ".join(parts)


Node = Compare | In | Like | Not | BoolOp


# ---- parser ----------------------------------------------------------------------------------


class _Parser:
    def __init__(self, src: str):
        self.tokens = _tokenize(src)
        self.i = 0
        self.depth = 0
        self.nodes = 0
        self.likes: list[Like] = []
        self.metadata_col: int | None = None

    # tokens
    def peek(self) -> _Tok:
        return self.tokens[self.i]

    def take(self) -> _Tok:
        tok = self.tokens[self.i]
        self.i += min(1, len(self.tokens) - 1 - self.i)
        return tok

    def at(self, punct: str) -> bool:
        tok = self.peek()
        return tok.kind == "punct" and tok.text == punct

    def keyword(self, word: str) -> bool:
        tok = self.peek()
        if tok.kind == "name" and tok.text.lower() == word:
            self.take()
            return True
        return False

    def expect(self, text: str, what: str) -> _Tok:
        tok = self.take()
        if tok.kind != "punct" or tok.text != text:
            raise _error(f"expected {what}, got {tok.shown}", tok.col)
        return tok

    def count(self, tok: _Tok) -> None:
        self.nodes += 1
        if self.nodes > MAX_FILTER_NODES:
            raise _error(f"more than {MAX_FILTER_NODES} conditions and operators", tok.col)

    # grammar
    def parse(self) -> Node:
        node = self.boolean("or", self.and_)
        tok = self.peek()
        if tok.kind != "end":
            raise _error(f"unexpected {tok.shown}", tok.col)
        if self.likes and self.metadata_col is not None:
            raise _error(f"'like' cannot be combined with a metadata[...] path (at column {self.metadata_col}): "
                         "milvus-lite evaluates that as a backtracking regex", self.likes[0].col)
        return node

    def and_(self) -> Node:
        return self.boolean("and", self.unary)

    def boolean(self, op: str, operand) -> Node:
        items = [operand()]
        while True:
            tok = self.peek()
            if not self.keyword(op):
                break
            self.count(tok)
            items.append(operand())
        return items[0] if len(items) == 1 else BoolOp(op, tuple(items))

    def unary(self) -> Node:
        tok = self.peek()
        paren = self.at("(")
        if paren or tok.kind == "name" and tok.text.lower() == "not":
            self.depth += 1
            if self.depth > MAX_FILTER_DEPTH:
                raise _error(f"nested deeper than {MAX_FILTER_DEPTH} levels", tok.col)
            self.take()
            if paren:
                node = self.boolean("or", self.and_)
                self.expect(")", "')'")
            else:
                self.count(tok)
                node = Not(self.unary())
            self.depth -= 1
            return node
        return self.comparison()

    def comparison(self) -> Node:
        field, ftok = self.field()
        self.count(ftok)
        tok = self.peek()
        if tok.kind == "op":
            self.take()
            return Compare(field, tok.text, self.value(field, tok.text))
        if self.keyword("like"):
            return self.like(field, tok)
        negate = self.keyword("not")
        if self.keyword("in"):
            return In(field, self.values(field), negate)
        bad = self.peek() if negate else tok
        raise _error(f"expected a comparison (== != < <= > >=), 'in' or 'like' after {ftok.shown}, got {bad.shown}",
                     bad.col)

    def field(self) -> tuple[Field, _Tok]:
        tok = self.take()
        if tok.kind != "name" or tok.text.lower() in _KEYWORDS:
            raise _error(f"expected a field ({_ALLOWED}), got {tok.shown}", tok.col)
        if tok.text == "metadata":
            self.expect("[", "'[' after metadata")
            key = self.take()
            if key.kind != "str" or not _KEY.match(key.text):
                raise _error(f"metadata key must be a quoted identifier (letters, digits, '_'), got {key.shown}",
                             key.col)
            self.expect("]", "']'")
            self.metadata_col = self.metadata_col or tok.col
            return Field("metadata", key.text), tok
        if tok.text in _COLUMNS:
            return Field(_COLUMNS[tok.text]), tok
        if tok.text in _UNFILTERABLE:
            raise _error(f"field {tok.text!r} cannot be filtered on (allowed: {_ALLOWED})", tok.col)
        raise _error(f"unknown field {tok.text!r} (allowed: {_ALLOWED})", tok.col)

    def literal(self) -> tuple[Value, _Tok]:
        tok = self.take()
        if tok.kind == "str":
            return tok.text, tok
        if tok.kind == "name" and tok.text.lower() in ("true", "false"):
            return tok.text.lower() == "true", tok
        if tok.kind != "num":
            raise _error(f"expected a string, number or true/false, got {tok.shown}", tok.col)
        if len(tok.text) <= 32:  # int() of a 5,000-digit string is slow; Milvus takes int64/double
            value = float(tok.text) if any(c in tok.text for c in ".eE") else int(tok.text)
            if (-(2**63) <= value < 2**63) if isinstance(value, int) else math.isfinite(value):
                return value, tok
        raise _error(f"number {tok.shown} out of range (int64 or a finite double)", tok.col)

    def value(self, field: Field, op: str) -> Value:
        value, tok = self.literal()
        kind = type(value)
        if field.column == "chunk_index" and kind is not int:
            raise _error(f"chunk_index compares with integers, got {tok.shown}", tok.col)
        if field.column in ("doc_id", "source") and kind is not str:
            raise _error(f"{field.column} compares with strings, got {tok.shown}", tok.col)
        if kind is bool and op not in ("==", "!="):
            raise _error(f"true/false only with == or !=, got {op!r}", tok.col)
        return value

    def values(self, field: Field) -> tuple[Value, ...]:
        open_ = self.expect("[", "'[' after in")
        items = [self.value(field, "==")]
        while self.at(","):
            self.take()
            items.append(self.value(field, "=="))
            if len(items) > MAX_IN_VALUES:
                raise _error(f"'in' list longer than {MAX_IN_VALUES} values", open_.col)
        self.expect("]", "']' or ','")
        return tuple(items)

    def like(self, field: Field, like_tok: _Tok) -> Like:
        if field.column not in ("doc_id", "source"):
            raise _error(f"'like' only on document or source, not {field.emit()}", like_tok.col)
        tok = self.take()
        if tok.kind != "str":
            raise _error(f"'like' needs a string pattern, got {tok.shown}", tok.col)
        if tok.text.count("%") > MAX_LIKE_WILDCARDS:
            raise _error(f"like pattern has more than {MAX_LIKE_WILDCARDS} '%' wildcards", tok.col)
        if "\\" in tok.text:
            raise _error("like pattern may not contain backslashes (escapes differ between Milvus versions)", tok.col)
        node = Like(field, tok.text, like_tok.col)
        self.likes.append(node)
        return node


def parse_filter(text: str) -> Node:
    """Parse a client filter into its tree; ``.emit()`` gives the Milvus expression.

    Raises:
        InvalidRequestError: Not a string, too long, or outside the grammar; the message names
            the offending token and its 1-based column (``param="filter"``).
    """
    if not isinstance(text, str):
        raise _error("must be a string")
    if len(text) > MAX_FILTER_CHARS:
        raise _error(f"longer than {MAX_FILTER_CHARS} characters")
    if not text.strip():
        raise _error("empty")
    return _Parser(text).parse()


def client_filter(client: str | None) -> str | None:
    """The Milvus expression for an optional client filter: None for None/blank, else parsed and re-emitted.

    Raises:
        InvalidRequestError: The filter is not in the grammar or exceeds a bound.
    """
    if client is None or (isinstance(client, str) and not client.strip()):
        return None
    return parse_filter(client).emit()


def combine_filters(server: str, client: str | None) -> str:
    """AND the server's filter with an optional client filter, never letting the client replace it.

    Every store path that takes a client filter (dense and hybrid search) goes through here.

    Args:
        server: The trusted expression (tenant scope); always applied.
        client: An untrusted filter in this module's grammar, or None/blank for none.

    Returns:
        ``server`` alone, or ``(<emitted client filter>) and (server)``.

    Raises:
        InvalidRequestError: The client filter is not in the grammar or exceeds a bound.
    """
    expr = client_filter(client)
    return server if expr is None else f"({expr}) and ({server})"
