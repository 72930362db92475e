"""Turn files and request payloads into Documents, reporting every file that is not one.

One loader interface for every format: ``load_file(path, doc_id, ...)`` yields Documents and
ItemErrors. Formats (see ``retrieval.converters`` for the libraries and why):

* ``.md``/``.markdown``/``.txt``: one document per file (UTF-8);
* ``.jsonl``: one document per line (``id``, ``text``, optional ``source`` and ``metadata``; other keys
  join the metadata);
* ``.pdf`` (pypdf; pages and headings kept), ``.html``/``.htm`` (trafilatura), ``.docx``/``.pptx``/
  ``.xlsx`` (markitdown, the ``office`` extra): one document per file, converted to Markdown.

A file's id is its path relative to the folder given (stable wherever the folder lives). Every file
under a folder is yielded: an unknown extension is a *skipped* ItemError naming the supported ones;
zero-byte, oversized, unreadable, encrypted, corrupt and text-less (scanned) files are failed
ItemErrors with the reason. Hidden files and folders are not walked.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from retrieval.converters import OFFICE_SUFFIXES, ConversionError, convert_html, convert_office, convert_pdf
from retrieval.types import Document, ItemError

__all__ = [
    "HTML_SUFFIXES",
    "SUPPORTED_SUFFIXES",
    "document_from_dict",
    "iter_files",
    "load_file",
    "load_paths",
    "parse_jsonl",
]

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = frozenset({".md", ".markdown", ".txt"})
HTML_SUFFIXES = frozenset({".html", ".htm"})
SUPPORTED_SUFFIXES = TEXT_SUFFIXES | HTML_SUFFIXES | OFFICE_SUFFIXES | {".jsonl", ".pdf"}
# UTF-8 takes at most 4 bytes per character: a file larger than this cannot be under the limit.
_MAX_BYTES_PER_CHAR = 4

Loaded = Document | ItemError


def _decode(data: bytes) -> str:
    """UTF-8 text (a leading BOM dropped); UnicodeDecodeError says where the bad byte is."""
    return data.decode("utf-8-sig")


def _utf8_reason(exc: UnicodeDecodeError) -> str:
    return f"not valid UTF-8 (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})"


def document_from_dict(obj: Any, origin: str, default_source: str | None = None) -> Document:
    """Build a Document from a JSON object (a ``.jsonl`` line or an HTTP request item).

    Args:
        obj: A mapping with ``id`` (str or int) and ``text`` (str); optional ``source`` (str) and
            ``metadata`` (object); any other key is added to the metadata.
        origin: Where the item came from, for error messages.
        default_source: ``source`` when the object has none; else the document id. (Never a line
            number: inserting a line above would change every later document's content hash.)

    Raises:
        ValueError: The object is not a valid document; the message says which field and why.
    """
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    doc_id, text = obj.get("id"), obj.get("text")
    if isinstance(doc_id, int) and not isinstance(doc_id, bool):
        doc_id = str(doc_id)
    if not isinstance(doc_id, str) or not doc_id:
        raise ValueError("field 'id' must be a non-empty string")
    if not isinstance(text, str):
        raise ValueError("field 'text' must be a string")
    source = obj.get("source", "")
    if not isinstance(source, str):
        raise ValueError("field 'source' must be a string")
    metadata = obj.get("metadata", {})
    if not isinstance(metadata, Mapping):
        raise ValueError("field 'metadata' must be an object")
    extra = {k: v for k, v in obj.items() if k not in ("id", "text", "source", "metadata")}
    return Document(
        id=doc_id,
        text=text,
        source=source or default_source or doc_id,
        metadata={**extra, **metadata},
        origin=origin,
    )


def parse_jsonl(data: bytes, origin: str, default_source: str | None = None) -> Iterator[Loaded]:
    """One Document (or ItemError) per non-blank line of JSON Lines ``data``.

    Args:
        data: The raw file content (decoded line by line, so one bad line costs only itself).
        origin: The file, for error messages (``origin:line``).
        default_source: ``source`` of documents that name none.
    """
    for lineno, raw in enumerate(data.splitlines(), start=1):
        where = f"{origin}:{lineno}"
        if not raw.strip():
            continue
        try:
            yield document_from_dict(json.loads(_decode(raw)), where, default_source)
        except UnicodeDecodeError as exc:
            yield ItemError(where, _utf8_reason(exc))
        except json.JSONDecodeError as exc:
            yield ItemError(where, f"invalid JSON: {exc.msg} (column {exc.colno})")
        except ValueError as exc:
            yield ItemError(where, str(exc))


def load_file(path: Path, doc_id: str, *, max_chars: int, max_bytes: int | None = None) -> Iterator[Loaded]:
    """Load one file as Documents; problems become ItemErrors naming the path.

    Args:
        path: The file.
        doc_id: Id for a single-document file (ignored for ``.jsonl``, whose lines carry ids).
        max_chars: Largest accepted document; bigger text files are refused before being read whole.
        max_bytes: Largest file read at all (any format); None = no limit beyond ``max_chars``.
    """
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        kinds = " ".join(sorted(SUPPORTED_SUFFIXES))
        yield ItemError(str(path), f"unsupported file type {suffix or '(none)'!r} (supported: {kinds})", doc_id,
                        skipped=True)
        return
    try:
        data = _read(path, suffix, max_chars, max_bytes)
    except _Refused as exc:
        yield ItemError(str(path), str(exc), doc_id)
        return
    if suffix == ".jsonl":
        yield from parse_jsonl(data, str(path), default_source=doc_id)
        return
    try:
        text, metadata = _convert(data, suffix)
    except UnicodeDecodeError as exc:
        yield ItemError(str(path), _utf8_reason(exc), doc_id)
        return
    except ConversionError as exc:
        yield ItemError(str(path), str(exc), doc_id)
        return
    yield Document(id=doc_id, text=text, source=doc_id, metadata=metadata, origin=str(path))


class _Refused(Exception):
    pass


def _read(path: Path, suffix: str, max_chars: int, max_bytes: int | None) -> bytes:
    try:
        size = path.stat().st_size
        if size == 0:
            raise _Refused("empty file (0 bytes)")
        if max_bytes is not None and size > max_bytes:
            raise _Refused(f"file too large: {size} bytes (limit {max_bytes}, ingest.max_file_bytes)")
        if suffix in TEXT_SUFFIXES and size > max_chars * _MAX_BYTES_PER_CHAR:
            raise _Refused(f"document too large: {size} bytes (limit {max_chars} characters)")
        return path.read_bytes()
    except OSError as exc:
        raise _Refused(f"cannot read: {exc.strerror or exc}") from exc


def _convert(data: bytes, suffix: str) -> tuple[str, dict[str, Any]]:
    """Text and metadata of a single-document file; ConversionError/UnicodeDecodeError say why not."""
    if suffix in TEXT_SUFFIXES:
        return _decode(data), {"format": "md" if suffix == ".markdown" else suffix[1:]}
    if suffix == ".pdf":
        converted = convert_pdf(data)
    elif suffix in HTML_SUFFIXES:
        converted = convert_html(data)
    else:
        converted = convert_office(data, suffix)
    return converted.text, converted.metadata


def iter_files(root: Path) -> Iterator[tuple[Path, str]]:
    """``(path, doc_id)`` for every file under ``root`` (unsupported ones too, to be reported), sorted.

    A file given directly gets its name as id; files in a folder get their path relative to it.
    Hidden files and folders are not walked.
    """
    if root.is_file():
        yield root, root.name
        return
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        yield path, rel.as_posix()


def load_paths(paths: Iterable[str | Path], *, max_chars: int, max_bytes: int | None = None) -> Iterator[Loaded]:
    """Documents (and ItemErrors) from files and folders, in a stable order.

    Args:
        paths: Files or folders (walked recursively).
        max_chars: Largest accepted document, in characters.
        max_bytes: Largest file read, in bytes (None = no limit of its own).
    """
    for raw in paths:
        root = Path(raw)
        if not root.exists():
            yield ItemError(str(root), "no such file or directory")
            continue
        for path, doc_id in iter_files(root):
            yield from load_file(path, doc_id, max_chars=max_chars, max_bytes=max_bytes)
