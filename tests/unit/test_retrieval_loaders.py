"""Loaders: file types, stable ids, and bad input reported per item."""

from __future__ import annotations

import json

import pytest

from retrieval.chunking import Chunker
from retrieval.config import ChunkingConfig
from retrieval.loaders import document_from_dict, load_paths, parse_jsonl
from retrieval.types import Document, ItemError
from tests import documents


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
    [png] = [i for i in items if isinstance(i, ItemError)]
    assert png.skipped and png.doc_id == "image.png" and "unsupported file type '.png'" in png.reason
    assert ".pdf" in png.reason  # names what is supported
    by_id = {d.id: d for d in items if isinstance(d, Document)}
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


def test_pdf_pages_headings_and_title(tmp_path):
    [doc] = load(documents.write_pdf(tmp_path / "manual.pdf"))
    assert doc.id == "manual.pdf" and doc.metadata == {"format": "pdf", "pages": 2, "title": "Staff handbook"}
    first, second = doc.text.split("\f")
    assert "# Handbook" in first and "## Shipping" in first and "Parcels leave" in first
    assert "## Refunds" in second and documents.PDF_FACT in second


@pytest.mark.parametrize("outline", [True, False])
def test_pdf_chunks_carry_page_and_heading_path(tmp_path, outline):
    """With bookmarks, or (outline=False) from font sizes alone, across the page break."""
    [doc] = load(documents.write_pdf(tmp_path / "manual.pdf", outline=outline))
    chunks = Chunker(ChunkingConfig(size=400, overlap=40)).split_document(doc.text, doc.metadata)
    [fact] = [c for c in chunks if documents.PDF_FACT in c.text]
    assert fact.metadata["page"] == 2 and fact.metadata["headings"] == ["Handbook", "Refunds"]
    assert doc.text[fact.start:fact.end] in fact.text
    assert {c.metadata["page"] for c in chunks} == {1, 2}


def test_html_main_text_without_navigation_or_scripts(tmp_path):
    [doc] = load(documents.write_html(tmp_path / "choir.html"))
    assert doc.metadata["format"] == "html" and doc.metadata["title"]
    assert documents.HTML_FACT in doc.text and "## Rehearsals" in doc.text
    for boilerplate in ("Shop menu item", "NAVSCRIPT", "Copyright footer", "color: #333"):
        assert boilerplate not in doc.text, boilerplate
    assert "| Student | 5 EUR |" in doc.text  # the table, as a Markdown table


@pytest.mark.parametrize("encoding", ["utf-8", "iso-8859-1"])
def test_html_in_its_declared_charset(tmp_path, encoding):
    page = (f'<html><head><meta charset="{encoding}"><title>Menu</title></head><body><main><h1>Café</h1>'
            "<p>The café serves crème brûlée every day of the week, with coffee and tea for everyone.</p>"
            "</main></body></html>")
    (tmp_path / "menu.html").write_bytes(page.encode(encoding))
    [doc] = load(tmp_path)
    assert "crème brûlée" in doc.text and "# Café" in doc.text


def test_docx_headings_and_table(tmp_path):
    [doc] = load(documents.write_docx(tmp_path / "report.docx"))
    assert doc.metadata["format"] == "docx"
    assert "# Annual report" in doc.text and "## Regions" in doc.text and documents.DOCX_FACT in doc.text
    assert "| North | 17% |" in doc.text


def test_pptx_slides_are_pages_and_xlsx_sheets_are_tables(tmp_path):
    deck, sheet = load(documents.write_pptx(tmp_path / "deck.pptx"), documents.write_xlsx(tmp_path / "stock.xlsx"))
    chunks = Chunker(ChunkingConfig(size=400, overlap=40)).split_document(deck.text, deck.metadata)
    [budget] = [c for c in chunks if "4200 EUR" in c.text]
    assert budget.metadata["page"] == 2 and budget.metadata["headings"] == ["Budget"]
    assert "## Stock" in sheet.text and "| Pens | 120 |" in sheet.text


@pytest.mark.parametrize(
    ("write", "reason"),
    [
        (documents.write_blank_pdf, "PDF has no text layer (2 pages"),
        (documents.write_encrypted_pdf, "encrypted PDF"),
        (lambda p: p.write_bytes(b"%PDF-1.7\n garbage") and p, "corrupt PDF"),
        (lambda p: p.write_bytes(b"") and p, "empty file (0 bytes)"),
    ],
    ids=["scanned", "encrypted", "corrupt", "zero-byte"],
)
def test_bad_pdfs_are_reported_with_reason(tmp_path, write, reason):
    write(tmp_path / "bad.pdf")
    (tmp_path / "good.md").write_text("# Fine\n\ntext", encoding="utf-8")
    items = load(tmp_path)
    [error] = [i for i in items if isinstance(i, ItemError)]
    assert error.item.endswith("bad.pdf") and error.doc_id == "bad.pdf" and not error.skipped
    assert reason in error.reason, error.reason
    assert [i.id for i in items if isinstance(i, Document)] == ["good.md"]


@pytest.mark.parametrize(
    ("name", "data", "reason"),
    [
        ("empty.html", b"<html><head><script>x()</script></head><body><nav>Home</nav></body></html>",
         "HTML page has no main text"),
        ("bad.docx", b"PK\x03\x04 not really a zip", "corrupt or unreadable DOCX"),
        ("locked.docx", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\0" * 100, "encrypted Office file"),
        ("bad.xlsx", b"plain text", "corrupt or unreadable XLSX"),
    ],
)
def test_bad_html_and_office_files_are_reported(tmp_path, name, data, reason):
    (tmp_path / name).write_bytes(data)
    [error] = load(tmp_path)
    assert isinstance(error, ItemError) and reason in error.reason and error.doc_id == name


def test_huge_file_refused_by_size_before_reading(tmp_path):
    documents.write_pdf(tmp_path / "manual.pdf")
    [error] = list(load_paths([tmp_path], max_chars=10_000, max_bytes=100))
    assert "file too large" in error.reason and "ingest.max_file_bytes" in error.reason


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


def test_ingest_accounts_for_every_file_and_stores_chunk_locations(tmp_path):
    """Through the Ingestor (fake embedder, in-memory store): counts, reasons, and chunk metadata."""
    import asyncio

    from retrieval.config import IngestConfig, RetrievalConfig
    from retrieval.retriever import Retriever
    from retrieval.testing import FakeEmbedder, InMemoryStore

    documents.write_pdf(tmp_path / "manual.pdf")
    documents.write_html(tmp_path / "choir.html")
    documents.write_docx(tmp_path / "report.docx")
    documents.write_blank_pdf(tmp_path / "scan.pdf")
    (tmp_path / "empty.md").write_bytes(b"")
    (tmp_path / "photo.png").write_bytes(b"\x89PNG")
    retriever = Retriever(RetrievalConfig(ingest=IngestConfig(show_progress=False)), embedder=FakeEmbedder(),
                          store=InMemoryStore())
    summary = retriever.ingestor.ingest_paths("kb", "acme", [tmp_path])
    assert (summary.added, summary.failed, summary.skipped) == (3, 2, 1)
    assert sorted((e.doc_id, e.reason.split(" (")[0]) for e in summary.errors) == [
        ("empty.md", "empty file"), ("scan.pdf", "PDF has no text layer")]
    assert [e.doc_id for e in summary.skipped_files] == ["photo.png"]
    assert summary.to_dict()["skipped_files"][0]["reason"].startswith("unsupported file type '.png'")
    chunks = asyncio.run(retriever.retrieve(documents.PDF_FACT, "kb", "acme", top_k=1))
    assert chunks[0].document == "manual.pdf"
    meta = chunks[0].metadata
    assert (meta["page"], meta["section"], meta["format"]) == (2, "Handbook › Refunds", "pdf")


def test_pdf_lines_that_look_like_markdown_are_not_headings(tmp_path):
    from fpdf import FPDF

    pdf = FPDF()
    pdf.add_page()
    pdf.set_font("Helvetica", size=11)
    for line in ["# 1 priority is safety", "Totals", "-----", "All parts are counted weekly."]:
        pdf.cell(0, 8, line, new_x="LMARGIN", new_y="NEXT")
    pdf.output(str(tmp_path / "plain.pdf"))
    [doc] = load(tmp_path / "plain.pdf")
    chunks = Chunker(ChunkingConfig(size=400, overlap=40)).split_document(doc.text, doc.metadata)
    assert all("headings" not in c.metadata for c in chunks), [c.metadata for c in chunks]
    assert "1 priority is safety" in doc.text and "All parts are counted weekly." in doc.text
