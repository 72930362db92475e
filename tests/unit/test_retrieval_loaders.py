"""Loaders: file types, stable ids, and bad input reported per item."""

from __future__ import annotations

import json

import pytest

from retrieval.loaders import document_from_dict, load_paths, parse_jsonl
from retrieval.types import Document, ItemError


def load(*paths, max_chars=10_000):
    return list(load_paths(paths, max_chars=max_chars))


def test_folder_of_md_txt_jsonl(tmp_path):
    (tmp_path / "guide").mkdir()
    (tmp_path / "guide" / "a.md").write_text("# A\nalpha", encoding="utf-8")
    (tmp_path / "b.txt").write_text("bravo", encoding="utf-8")
    lines = [{"id": "c1", "text": "charlie", "metadata": {"lang": "en"}, "team": "x"}, {"id": 2, "text": "delta"}]
    (tmp_path / "more.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n", encoding="utf-8")
    (tmp_path / ".hidden.md").write_text("secret", encoding="utf-8")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    items = load(tmp_path)
    assert all(isinstance(i, Document) for i in items)
    by_id = {d.id: d for d in items}
    assert set(by_id) == {"guide/a.md", "b.txt", "c1", "2"}
    assert by_id["guide/a.md"].text == "# A\nalpha" and by_id["guide/a.md"].source == "guide/a.md"
    assert by_id["c1"].metadata == {"lang": "en", "team": "x"}
    assert by_id["c1"].source == "more.jsonl"  # default source: the file, never a line number
    assert by_id["c1"].origin.endswith("more.jsonl:1")


def test_single_file_id_is_its_name(tmp_path):
    path = tmp_path / "notes.md"
    path.write_text("hello", encoding="utf-8")
    [doc] = load(path)
    assert doc.id == "notes.md"


def test_non_utf8_file_is_reported_with_path_and_position(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe not utf8")
    (tmp_path / "good.txt").write_text("fine", encoding="utf-8")
    items = load(tmp_path)
    [error] = [i for i in items if isinstance(i, ItemError)]
    assert error.item.endswith("bad.txt") and error.doc_id == "bad.txt"
    assert "not valid UTF-8" in error.reason and "0xff" in error.reason and "offset 3" in error.reason
    assert [i.id for i in items if isinstance(i, Document)] == ["good.txt"]


def test_pdf_is_reported_unsupported(tmp_path):
    (tmp_path / "paper.pdf").write_bytes(b"%PDF-1.7")
    [error] = load(tmp_path)
    assert isinstance(error, ItemError) and "PDF is not supported" in error.reason


def test_oversized_file_refused_before_reading(tmp_path):
    (tmp_path / "big.txt").write_text("x" * 500, encoding="utf-8")
    [error] = load(tmp_path, max_chars=100)
    assert isinstance(error, ItemError) and "too large" in error.reason


def test_missing_path_and_unsupported_explicit_file(tmp_path):
    (tmp_path / "data.csv").write_text("a,b", encoding="utf-8")
    missing, unsupported = load(tmp_path / "nope", tmp_path / "data.csv")
    assert "no such file" in missing.reason
    assert "unsupported file type '.csv'" in unsupported.reason


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"{not json", "invalid JSON"),
        (b'{"text": "no id"}', "field 'id'"),
        (b'{"id": "x"}', "field 'text'"),
        (b'{"id": "x", "text": "t", "metadata": [1]}', "field 'metadata'"),
        (b'{"id": "x", "text": "t", "source": 3}', "field 'source'"),
        (b'["a list"]', "expected a JSON object"),
        (b'{"id": "x", "text": "\xff"}', "not valid UTF-8"),
    ],
)
def test_bad_jsonl_lines_are_per_line_errors(line, reason):
    data = b'{"id": "ok1", "text": "one"}\n' + line + b'\n{"id": "ok2", "text": "two"}\n'
    items = list(parse_jsonl(data, "upload.jsonl"))
    assert [i.id for i in items if isinstance(i, Document)] == ["ok1", "ok2"]
    [error] = [i for i in items if isinstance(i, ItemError)]
    assert error.item == "upload.jsonl:2" and reason in error.reason


def test_document_from_dict_defaults():
    doc = document_from_dict({"id": "d", "text": "t"}, "documents[0]")
    assert (doc.source, doc.metadata, doc.origin) == ("d", {}, "documents[0]")
