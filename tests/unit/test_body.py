"""Hostile request bodies are a 400 that says what is wrong, never a server error."""

from __future__ import annotations

import asyncio
import json

import pytest

from cluster.errors import InvalidRequestError
from serve.body import check_json_body, parse_json


def _refused(raw: bytes, code: str) -> str:
    with pytest.raises(InvalidRequestError) as info:
        parse_json(raw)
    err = info.value
    assert (err.status, err.code) == (400, code)
    return err.message


def test_plain_json_parses():
    assert parse_json(b'{"model": "m", "n": 2, "x": [1, {"y": null}]}') == {"model": "m", "n": 2, "x": [1, {"y": None}]}
    assert parse_json(b"[1, 2]") == [1, 2]  # the shape is the caller's business


def test_nesting_up_to_the_limit_is_accepted():
    assert parse_json(b"[" * 64 + b"]" * 64) is not None
    assert parse_json(b'{"a": ' * 63 + b"1" + b"}" * 63) is not None


@pytest.mark.parametrize("raw", [b"[" * 65 + b"]" * 65, b"[" * 5000 + b"]" * 5000, b'{"a": ' * 65 + b"1" + b"}" * 65,
                                 b"[" * 100_000])
def test_deep_nesting_is_refused_before_parsing(raw):
    assert "nests deeper than 64 levels" in _refused(raw, "invalid_json")


@pytest.mark.parametrize("text", ["[" * 500, "{" * 500, '\\"' + "[" * 500, "\\\\" + "]" * 10])
def test_brackets_inside_strings_do_not_count(text):
    raw = json.dumps({"prompt": text}).encode()
    assert parse_json(raw) == {"prompt": json.loads(raw)["prompt"]}


def test_a_huge_integer_is_a_400_with_the_reason():
    message = _refused(b'{"max_tokens": 1' + b"0" * 5000 + b"}", "invalid_json")
    assert "not valid JSON" in message and "digits" in message
    assert parse_json(b'{"n": ' + b"9" * 4300 + b"}")["n"] > 0  # Python's own limit is 4300 digits


def test_invalid_json_is_a_400():
    assert "not valid JSON" in _refused(b'{"model": ', "invalid_json")
    assert "not valid JSON" in _refused(b"", "invalid_json")


@pytest.mark.parametrize(
    ("raw", "byte"),
    [(b'{"a": "\xff"}', 7), (b"\xfe{}", 0), (b'{"a": "\xe2\x82"}', 7), (b'{"a": "\xed\xa0\x80"}', 7),  # CESU surrogate
     (b'{"a": "ok \xc3\xa9", "b": "\xc0\xaf"}', 21)],  # overlong "/"
)
def test_invalid_utf8_names_the_byte(raw, byte):
    assert f"not valid UTF-8 (byte {byte})" in _refused(raw, "invalid_utf8")


@pytest.mark.parametrize(
    "escape",
    [b"\\ud800", b"\\udfff", b"\\uDC00", b"\\uD83D", b"\\ude00\\ud83d", b"x\\ud83d y", b"\\ud83d\\u0041"],
)
def test_lone_surrogates_are_refused(escape):
    for raw in (b'{"prompt": "' + escape + b'"}', b'{"' + escape + b'": 1}', b'{"m": [{"c": ["' + escape + b'"]}]}'):
        assert "lone UTF-16 surrogate" in _refused(raw, "invalid_json")


def test_valid_surrogate_pairs_are_accepted():
    assert parse_json(b'{"prompt": "smile \\ud83d\\ude00"}') == {"prompt": "smile \U0001f600"}
    assert parse_json(b'{"prompt": "\\uD83D\\uDE00\\ud83d\\ude01"}') == {"prompt": "\U0001f600\U0001f601"}
    assert parse_json('{"prompt": "raw \U0001f600 é"}'.encode()) == {"prompt": "raw \U0001f600 é"}


def test_an_escaped_backslash_before_u_is_not_a_surrogate():
    # JSON "\\ud800" is the six characters \ud800, not an escape.
    assert parse_json(b'{"prompt": "\\\\ud800"}') == {"prompt": "\\ud800"}


class _Request:
    def __init__(self, raw: bytes):
        self._raw = raw

    async def body(self) -> bytes:
        return self._raw


def test_check_json_body_dependency():
    asyncio.run(check_json_body(_Request(b"")))  # no body: the route decides
    asyncio.run(check_json_body(_Request(b'{"version": 2}')))
    with pytest.raises(InvalidRequestError, match="lone UTF-16 surrogate"):
        asyncio.run(check_json_body(_Request(b'{"x": "\\ud800"}')))
