"""Filter combination: the tenant scope is always ANDed and cannot be escaped."""

from __future__ import annotations

import pytest

from cluster.errors import InvalidRequestError
from retrieval.filters import MAX_FILTER_CHARS, combine_filters, eq, in_list, quote

SERVER = eq("tenant", "acme")


def test_quote_escapes_backslash_and_quotes():
    assert quote('a"b\\c') == '"a\\"b\\\\c"'
    assert eq("doc_id", 'x" or "1') == 'doc_id == "x\\" or \\"1"'
    assert in_list("doc_id", ["a", 'b"']) == 'doc_id in ["a", "b\\""]'


@pytest.mark.parametrize("client", [None, "", "   "])
def test_no_client_filter_keeps_server_filter(client):
    assert combine_filters(SERVER, client) == SERVER


def test_client_filter_is_parenthesised_and_anded():
    combined = combine_filters(SERVER, 'metadata["lang"] == "en" or chunk_index < 2')
    assert combined == '(metadata["lang"] == "en" or chunk_index < 2) and (tenant == "acme")'


@pytest.mark.parametrize(
    "client",
    [
        'chunk_index > 0) or (tenant != ""',  # closes our parenthesis early
        "chunk_index > 0) or true or (1 == 1",
        "(chunk_index > 0",
        "chunk_index in [1, 2)",
        'doc_id == "unterminated',
        "doc_id == 'x\\' ) or (true",  # the escaped quote keeps the paren inside the string
    ],
)
def test_unbalanced_client_filters_are_rejected(client):
    with pytest.raises(InvalidRequestError) as info:
        combine_filters(SERVER, client)
    assert info.value.param == "filter" and info.value.status == 400


def test_brackets_inside_strings_are_fine():
    client = 'doc_id == "a)" or source == \'(b]\' or doc_id == "c\\")"'
    assert combine_filters(SERVER, client) == f"({client}) and ({SERVER})"


def test_too_long_or_non_string_filter():
    with pytest.raises(InvalidRequestError, match="longer than"):
        combine_filters(SERVER, "a" * (MAX_FILTER_CHARS + 1))
    with pytest.raises(InvalidRequestError, match="string"):
        combine_filters(SERVER, 42)
