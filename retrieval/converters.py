"""File formats → Markdown text + metadata, each with a well-kept library; failures say why.

Chosen by a measurement on generated files (a 20-page PDF, a 50-section HTML page with nav/script/
footer, a 50-section DOCX with a table; 2 shared CPU cores):

* **PDF — pypdf** (text layer, 74 ms for 20 pages). Pages are joined by form feeds (the chunker
  numbers pages at them). Headings come from the PDF outline (bookmarks) when it has one, else
  from font size (lines set clearly larger than the body text); they become Markdown headings.
  markitdown's PDF path needs pdfminer and keeps no page numbers.
* **HTML — trafilatura** (12 ms, ``favor_precision``): main text with headings and tables as
  Markdown, navigation/header/footer/scripts dropped. markitdown (29 ms) kept the navigation bar
  and the footer.
* **DOCX / PPTX / XLSX — markitdown** (mammoth, python-pptx, openpyxl underneath; ~0.4 s for the
  DOCX): headings, lists and tables as Markdown. python-docx alone was faster (13 ms) but gives
  neither heading levels nor tables without hand-written walking. Optional: the ``office`` extra.

Every function raises :class:`ConversionError` with a reason meant for the ingest summary.
"""

from __future__ import annotations

import io
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from retrieval.chunking import PAGE_BREAK

__all__ = ["OFFICE_SUFFIXES", "Converted", "ConversionError", "convert_html", "convert_office", "convert_pdf"]

logger = logging.getLogger(__name__)

OFFICE_SUFFIXES = frozenset({".docx", ".pptx", ".xlsx"})
# A line set this much larger than the body text is a heading (PDFs without an outline).
_HEADING_SCALE = 1.15
_MAX_HEADING_CHARS = 120


class ConversionError(Exception):
    """A file that cannot be turned into text; ``str(exc)`` is the reason for the summary."""


@dataclass(frozen=True)
class Converted:
    """Markdown text of a file and what is known about it (title, pages)."""

    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


# ---- PDF ------------------------------------------------------------------------------------


def convert_pdf(data: bytes) -> Converted:
    """Text layer of a PDF, pages separated by form feeds, headings as Markdown.

    Raises:
        ConversionError: Encrypted (password needed), corrupt, or no text layer (scanned).
    """
    from pypdf import PdfReader
    from pypdf.errors import DependencyError, FileNotDecryptedError, PdfReadError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise ConversionError("encrypted PDF: a password is needed to read it")
        pages = [_page_text(page) for page in reader.pages]
        outline = _outline(reader)
    except ConversionError:
        raise
    except (FileNotDecryptedError, DependencyError) as exc:
        raise ConversionError(f"encrypted PDF: {exc}") from exc
    except (PdfReadError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConversionError(f"corrupt PDF: {type(exc).__name__}: {exc}") from exc
    if not pages or not any(text.strip() for text, _ in pages):
        raise ConversionError(f"PDF has no text layer ({len(pages)} pages, 0 characters extracted; a scanned "
                              "document needs OCR first, e.g. ocrmypdf)")
    body = _body_size([sizes for _, sizes in pages])
    levels = _heading_levels([sizes for _, sizes in pages], body)
    texts = []
    for number, (text, sizes) in enumerate(pages, start=1):
        if outline:
            texts.append(_mark_headings(text, outline.get(number, []), insert_missing=True))
        else:
            texts.append(_mark_headings(text, _large_lines(sizes, levels), insert_missing=False))
    metadata: dict[str, Any] = {"format": "pdf", "pages": len(pages)}
    title = (reader.metadata or {}).get("/Title") if reader.metadata else None
    if isinstance(title, str) and title.strip():
        metadata["title"] = title.strip()
    empty = [n for n, (text, _) in enumerate(pages, start=1) if not text.strip()]
    if empty:
        metadata["pages_without_text"] = empty[:50]
    return Converted(PAGE_BREAK.join(texts), metadata)


def _page_text(page: Any) -> tuple[str, list[tuple[float, str]]]:
    """pypdf's text of one page, and (font size, text) of each piece it drew (for headings)."""
    sizes: list[tuple[float, str]] = []

    def visit(text: str, cm: Any, tm: Any, font: Any, size: float) -> None:
        if text.strip():
            scale = abs(float(tm[3]) or 1.0) * abs(float(cm[3]) or 1.0)
            sizes.append((round(float(size) * scale, 1), text))

    text = page.extract_text(visitor_text=visit) or ""
    return text.replace(PAGE_BREAK, "\n"), sizes


def _outline(reader: Any) -> dict[int, list[tuple[int, str]]]:
    """Page number → [(level, title)] from the PDF's bookmarks (empty when it has none)."""
    marks: dict[int, list[tuple[int, str]]] = {}

    def walk(items: list[Any], level: int) -> None:
        for item in items:
            if isinstance(item, list):
                walk(item, level + 1)
                continue
            try:
                page = reader.get_destination_page_number(item) + 1
            except Exception:  # a dangling bookmark costs only itself
                continue
            title = " ".join(str(getattr(item, "title", "") or "").split())
            if title:
                marks.setdefault(page, []).append((min(level, 6), title))

    try:
        walk(reader.outline, 1)
    except Exception as exc:  # a broken outline must not cost the text
        logger.info("PDF outline unreadable (%s); headings from font sizes", type(exc).__name__)
        return {}
    return marks


def _body_size(pages: list[list[tuple[float, str]]]) -> float:
    """The font size that sets the most characters."""
    counts: Counter[float] = Counter()
    for sizes in pages:
        for size, text in sizes:
            counts[size] += len(text)
    return counts.most_common(1)[0][0] if counts else 0.0


def _heading_levels(pages: list[list[tuple[float, str]]], body: float) -> dict[float, int]:
    """Font sizes clearly larger than the body → heading level, biggest = 1, over the whole document."""
    sizes = {size for page in pages for size, _ in page if body and size >= body * _HEADING_SCALE}
    return {size: min(rank, 6) for rank, size in enumerate(sorted(sizes, reverse=True), start=1)}


def _large_lines(sizes: list[tuple[float, str]], levels: dict[float, int]) -> list[tuple[int, str]]:
    """(level, text) of the short pieces of a page set in a heading size."""
    big = [(levels[size], " ".join(text.split())) for size, text in sizes if size in levels]
    return [(level, text) for level, text in big
            if 2 <= len(text) <= _MAX_HEADING_CHARS and any(ch.isalpha() for ch in text)]


def _mark_headings(text: str, marks: list[tuple[int, str]], *, insert_missing: bool) -> str:
    """Turn the lines holding each heading into Markdown headings, in order.

    A bookmark whose title is on no line of its page (``insert_missing``) leads the page instead.
    """
    lines = text.split("\n")
    missing, cursor, marked = [], 0, set()
    for level, title in marks:
        wanted = _squash(title)
        hit = next((i for i in range(cursor, len(lines)) if _squash(lines[i]) == wanted), None)
        if hit is None:
            if insert_missing:
                missing.append("#" * level + " " + title)
            continue
        lines[hit] = "#" * level + " " + " ".join(lines[hit].split())
        marked.add(hit)
        cursor = hit + 1
    # Blank lines around headings so Markdown sees them as blocks of their own.
    body = "\n".join(f"\n{line}\n" if i in marked else _escape(line) for i, line in enumerate(lines))
    return "\n\n".join([*missing, body]) if missing else body


def _squash(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


def _escape(line: str) -> str:
    """A PDF line that would read as Markdown structure it is not (heading, code) is neutralised."""
    stripped = line.lstrip()
    if stripped.startswith("#") or re.fullmatch(r"[=-]{2,}\s*", stripped):  # ATX or setext heading marks
        return "\\" + stripped
    return stripped if line.startswith("    ") else line


# ---- HTML -----------------------------------------------------------------------------------


def convert_html(data: bytes) -> Converted:
    """Main text of an HTML page as Markdown (headings, lists, tables); navigation and scripts dropped.

    Raises:
        ConversionError: The page has no main text.
    """
    import trafilatura
    from trafilatura.utils import decode_file

    # trafilatura's decoder honours the page's charset (BOM, <meta charset>) and guesses otherwise.
    html = decode_file(data)
    html = _without_boilerplate(html) or html
    options = {"output_format": "markdown", "include_tables": True, "include_formatting": True,
               "include_links": False, "include_images": False, "include_comments": False}
    # favor_precision keeps most boilerplate out, but on small pages trafilatura's fallbacks return
    # menus: navigation, page headers/footers and scripts are cut from the tree first.
    text = trafilatura.extract(html, favor_precision=True, **options) or trafilatura.extract(html, **options)
    if not text or not text.strip():
        raise ConversionError("HTML page has no main text (only navigation, scripts or markup)")
    metadata: dict[str, Any] = {"format": "html"}
    meta = trafilatura.extract_metadata(html)
    if meta is not None and meta.title:
        metadata["title"] = meta.title
    return Converted(text, metadata)


# A <header>/<footer> inside <article> or <main> is the article's own (its title): kept.
_BOILERPLATE = ("//nav|//aside|//script|//style|//noscript|//form|//*[@role='navigation']"
                "|//header[not(ancestor::article or ancestor::main)]|//footer[not(ancestor::article or ancestor::main)]")


def _without_boilerplate(html: str) -> str | None:
    from lxml import etree
    from lxml import html as lxml_html

    try:
        tree = lxml_html.fromstring(html)
    except (etree.ParserError, ValueError):
        return None
    for element in tree.xpath(_BOILERPLATE):
        element.drop_tree()
    return lxml_html.tostring(tree, encoding="unicode")


# ---- Office ---------------------------------------------------------------------------------


def convert_office(data: bytes, suffix: str) -> Converted:
    """DOCX, PPTX or XLSX as Markdown through markitdown's converter for that format.

    Raises:
        ConversionError: markitdown is not installed, or the file is not a readable document.
    """
    try:
        from markitdown import StreamInfo
        from markitdown.converters import DocxConverter, PptxConverter, XlsxConverter
    except ImportError as exc:
        raise ConversionError(f"{suffix} files need markitdown: pip install 'ragtune[office]' ({exc.name} "
                              "is missing)") from exc
    converter = {".docx": DocxConverter, ".pptx": PptxConverter, ".xlsx": XlsxConverter}[suffix]()
    if not data.startswith(b"PK"):
        kind = "an encrypted Office file" if data.startswith(b"\xd0\xcf\x11\xe0") else "not a ZIP container"
        raise ConversionError(f"corrupt or unreadable {suffix[1:].upper()}: {kind}")
    try:
        result = converter.convert(io.BytesIO(data), StreamInfo(extension=suffix))
    except Exception as exc:  # the converters raise whatever their parser raises (BadZipFile, KeyError, …)
        raise ConversionError(f"corrupt or unreadable {suffix[1:].upper()}: {type(exc).__name__}: {exc}") from exc
    text = result.markdown or ""
    if suffix == ".pptx":
        # Slides become pages (form feeds), so a chunk cites its slide like a PDF chunk its page.
        parts = re.split(r"<!-- Slide number: \d+ -->", text)
        text = PAGE_BREAK.join(part.strip() for part in parts[1:]) if len(parts) > 1 else text
    metadata: dict[str, Any] = {"format": suffix[1:]}
    if result.title:
        metadata["title"] = result.title
    return Converted(text, metadata)
