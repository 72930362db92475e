"""Structure-aware, budgeted chunking: sections by heading, blocks kept whole, long blocks split by semchunk.

A document's text is read as Markdown (the converters in ``retrieval.converters`` turn PDF, HTML and
Office files into Markdown; ``.txt`` documents are read as plain paragraphs):

1. **Pages.** A form feed (``\\f``) separates PDF pages (PPTX slides); chunks never cross one, so a
   chunk's page is exact.
2. **Sections.** markdown-it-py parses each page into top-level blocks (headings, paragraphs, lists,
   tables, code). A heading opens a section; the heading path (``Handbook › Refunds › Exceptions``)
   carries on across pages.
3. **Packing.** Whole blocks are packed into chunks of at most ``size`` units (characters, or tokens
   of the embedder's tokenizer). A block that fits is never cut, so a table that fits stays whole.
   A block longer than ``size`` is split by ``semchunk`` (which cuts at the largest whitespace runs,
   then sentences, then words) with ``overlap`` units shared between its pieces.
4. **Context** (``heading_context``, off by default): a chunk that does not start with its own
   heading gets its heading path as a first line; the prefix counts against the budget.

Each chunk keeps its character span in the document text, its heading path and (PDF) page. The
packing is hand-written (~20 lines) because the splitters on PyPI (semchunk, langchain's
splitters) take one string and do not know Markdown blocks; every cut inside a block is semchunk's.
Same text + same config → same chunks, so chunk ids (doc id + index) are stable across runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from retrieval.config import ChunkingConfig

__all__ = ["HEADING_SEPARATOR", "PAGED_FORMATS", "PAGE_BREAK", "Chunker", "TextChunk"]

PAGE_BREAK = "\f"
HEADING_SEPARATOR = " › "
# Plain-text formats: no Markdown structure is read from them (a line of '=' is not a heading there).
_PLAIN_FORMATS = frozenset({"txt"})
# Formats whose form feeds are page (slide) boundaries.
PAGED_FORMATS = frozenset({"pdf", "pptx"})


@dataclass(frozen=True)
class TextChunk:
    """One chunk: the text to embed and store, where it came from in the document."""

    text: str
    start: int
    end: int
    headings: tuple[str, ...] = ()
    page: int | None = None

    @property
    def metadata(self) -> dict[str, Any]:
        """What is stored with the chunk (``sources[].metadata`` in responses)."""
        meta: dict[str, Any] = {"char_start": self.start, "char_end": self.end}
        if self.headings:
            meta["headings"] = list(self.headings)
            meta["section"] = HEADING_SEPARATOR.join(self.headings)
        if self.page is not None:
            meta["page"] = self.page
        return meta


@dataclass
class _Block:
    start: int
    end: int
    headings: tuple[str, ...]
    is_heading: bool = False
    cost: int = 0


@dataclass
class _Draft:
    blocks: list[_Block] = field(default_factory=list)
    cost: int = 0


class Chunker:
    """Splits documents into structure-aware chunks according to a ChunkingConfig."""

    def __init__(self, config: ChunkingConfig | None = None, tokenizer: Any = None):
        """Create a chunker.

        Args:
            config: Unit, size, overlap, heading context.
            tokenizer: A Hugging Face tokenizer; required when ``config.unit == "token"``.
        """
        self.config = config or ChunkingConfig()
        if self.config.unit == "token" and tokenizer is None:
            raise ValueError("chunking.unit='token' needs the embedder's tokenizer")
        self._tokenizer = tokenizer
        self._backend = _counting_backend(tokenizer) if self.config.unit == "token" else None
        self._count: Callable[[str], int] = self._count_tokens if self.config.unit == "token" else len
        self._semchunk: Any = None
        self._markdown: Any = None

    def split(self, text: str, format: str | None = None) -> list[str]:
        """The chunk texts of ``text``, in order (see :meth:`chunks`)."""
        return [chunk.text for chunk in self.chunks(text, format)]

    def split_document(self, text: str, metadata: Mapping[str, Any]) -> list[TextChunk]:
        """Chunks of a document, its format taken from ``metadata["format"]`` (as the loaders set it)."""
        fmt = metadata.get("format")
        return self.chunks(text, fmt if isinstance(fmt, str) else None)

    def chunks(self, text: str, format: str | None = None) -> list[TextChunk]:
        """Non-blank chunks of ``text`` with span, heading path and page (PDF), in order.

        Args:
            text: The document text.
            format: ``"pdf"``/``"pptx"`` number pages (slides) at form feeds; ``"txt"`` reads no Markdown.
        """
        chunks: list[TextChunk] = []
        headings: tuple[str, ...] = ()
        paged = format in PAGED_FORMATS
        for number, (start, end) in enumerate(_pages(text, paged), start=1):
            blocks, headings = self._blocks(text, start, end, headings, plain=format in _PLAIN_FORMATS)
            for draft in self._pack(blocks):
                chunks.extend(self._emit(text, draft, number if paged else None))
        return chunks

    # ---- structure ---------------------------------------------------------------------------

    def _blocks(self, text: str, start: int, end: int, headings: tuple[str, ...], plain: bool
                ) -> tuple[list[_Block], tuple[str, ...]]:
        page = text[start:end]
        spans = [(s, e, None) for s, e in _paragraph_spans(page)] if plain else self._markdown_spans(page)
        blocks = []
        for s, e, heading in spans:
            if heading is not None:
                level, title = heading
                headings = headings[: level - 1] + ("",) * max(0, level - 1 - len(headings)) + (title,)
            s, e = _trim(page, s, e)
            if s < e:
                block = _Block(start + s, start + e, tuple(h for h in headings if h), heading is not None)
                block.cost = self._count(text[block.start:block.end])
                blocks.append(block)
        return blocks, headings

    def _markdown_spans(self, page: str) -> list[tuple[int, int, tuple[int, str] | None]]:
        if self._markdown is None:
            from markdown_it import MarkdownIt

            self._markdown = MarkdownIt("commonmark").enable("table")
        tokens = self._markdown.parse(page)
        line_starts = [0] + [i + 1 for i, ch in enumerate(page) if ch == "\n"] + [len(page)]
        spans = []
        for index, token in enumerate(tokens):
            if token.level != 0 or token.map is None or token.nesting == -1:
                continue
            first, last = token.map
            s, e = line_starts[min(first, len(line_starts) - 1)], line_starts[min(last, len(line_starts) - 1)]
            heading = None
            if token.type == "heading_open":
                title = " ".join(tokens[index + 1].content.split())
                heading = (int(token.tag[1]), title) if title else None
            spans.append((s, e, heading))
        return spans

    # ---- packing -----------------------------------------------------------------------------

    def _pack(self, blocks: list[_Block]) -> list[_Draft]:
        """Whole blocks packed greedily into drafts of at most ``size`` units, one section per draft.

        Headings always take the next block with them (never a chunk holding only a title); a
        draft that is still over budget then is one long block, which :meth:`_emit` cuts.
        """
        drafts: list[_Draft] = []
        current = _Draft()
        for block in blocks:
            if current.blocks:
                leading = _only_headings(current)
                same_section = current.blocks[-1].headings == block.headings
                fits = current.cost + block.cost + self._context_cost(current.blocks[0]) <= self.config.size
                if not leading and not (same_section and fits):
                    drafts.append(current)
                    current = _Draft()
            current.blocks.append(block)
            current.cost += block.cost
        if current.blocks:
            drafts.append(current)
        return drafts

    def _context_cost(self, first: _Block) -> int:
        prefix = "" if first.is_heading else self._context(first.headings)
        return self._count(prefix) if prefix else 0

    def _context(self, headings: tuple[str, ...]) -> str:
        if not self.config.heading_context or not headings:
            return ""
        return HEADING_SEPARATOR.join(headings) + "\n\n"

    def _emit(self, text: str, draft: _Draft, page: int | None) -> list[TextChunk]:
        first, last = draft.blocks[0], draft.blocks[-1]
        if draft.cost + self._context_cost(first) <= self.config.size:
            prefix = "" if first.is_heading else self._context(first.headings)
            return [TextChunk(prefix + text[first.start:last.end], first.start, last.end, last.headings, page)]
        # One block longer than the budget (with the headings before it): semchunk cuts it.
        context = self._context(last.headings)
        if context and self._count(context) > self.config.size // 2:
            context = ""  # a heading path that would eat most of the budget is left to the metadata
        budget = self.config.size - (self._count(context) if context else 0)
        out = []
        for start, end in self._split_long(text, first.start, last.end, budget):
            prefix = "" if start == first.start and first.is_heading else context
            out.append(TextChunk(prefix + text[start:end], start, end, last.headings, page))
        return out

    def _split_long(self, text: str, start: int, end: int, budget: int) -> list[tuple[int, int]]:
        import semchunk

        if self._semchunk is None or self._semchunk[0] != budget:
            self._semchunk = (budget, semchunk.chunkerify(self._count, max(budget, 1)))
        overlap = min(self.config.overlap, budget // 2) or None
        pieces, offsets = self._semchunk[1](text[start:end], offsets=True, overlap=overlap)
        spans = []
        for (s, e), piece in zip(offsets, pieces, strict=True):
            if piece.strip():
                s, e = _trim(text, start + s, start + e)
                spans.append((s, e))
        return spans

    def _count_tokens(self, text: str) -> int:
        if self._backend is not None:
            return len(self._backend.encode(text, add_special_tokens=False).ids)
        encoded = self._tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        return len(encoded["offset_mapping"])


def _counting_backend(tokenizer: Any) -> Any:
    """A private copy of a fast tokenizer's Rust backend with truncation and padding off, or None.

    semchunk counts ~16 substrings per chunk it cuts; through ``PreTrainedTokenizerFast.__call__``
    a count costs ~0.1 ms of Python around the Rust call (measured: token-unit chunking 0.8 ms a
    chunk, ~8% of MiniLM's encode time on 2 cores). A copy, not the shared backend: the embedder's
    encode leaves truncation (max_seq_length) set on it, which would cap the counts.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        return None
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(backend.to_str())
    copy.no_truncation()
    copy.no_padding()
    return copy


def _pages(text: str, paged: bool) -> list[tuple[int, int]]:
    if not paged:
        return [(0, len(text))]
    breaks = [i for i, ch in enumerate(text) if ch == PAGE_BREAK]
    starts, ends = [0] + [b + 1 for b in breaks], breaks + [len(text)]
    return list(zip(starts, ends, strict=True))


def _paragraph_spans(text: str) -> list[tuple[int, int]]:
    """Blank-line separated paragraphs of plain text."""
    spans, start = [], 0
    while start < len(text):
        cut = text.find("\n\n", start)
        end = len(text) if cut == -1 else cut
        spans.append((start, end))
        start = end + 2
    return spans


def _trim(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _only_headings(draft: _Draft) -> bool:
    return all(block.is_heading for block in draft.blocks)
