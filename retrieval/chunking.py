"""Cut documents into overlapping windows of characters or tokens.

No text-splitting library is installed in this environment (langchain-text-splitters,
semantic-text-splitter, chonkie: none), so this is a small deterministic splitter:

* ``char``: windows of ``size`` characters; each window ends at the last paragraph break,
  line break, sentence end or space in its second half (so words are not cut), and the next
  window starts ``overlap`` characters earlier, moved forward to a word start.
* ``token``: windows of ``size`` tokens of the embedder's tokenizer, ``overlap`` tokens shared,
  cut from the original text by the tokenizer's character offsets (so no text is rewritten and
  no window is longer than the model reads).

Same text + same config → same chunks, which keeps chunk ids (doc id + index) stable.
"""

from __future__ import annotations

from typing import Any

from retrieval.config import ChunkingConfig

__all__ = ["Chunker"]

# Preferred window ends, best first; each is searched for in the window's second half.
_BREAKS = ("\n\n", "\n", ". ", "? ", "! ", "; ", ", ", " ")


class Chunker:
    """Splits text into overlapping windows according to a ChunkingConfig."""

    def __init__(self, config: ChunkingConfig | None = None, tokenizer: Any = None):
        """Create a chunker.

        Args:
            config: Window unit, size and overlap.
            tokenizer: A Hugging Face fast tokenizer; required when ``config.unit == "token"``.
        """
        self.config = config or ChunkingConfig()
        if self.config.unit == "token" and tokenizer is None:
            raise ValueError("chunking.unit='token' needs the embedder's tokenizer")
        self._tokenizer = tokenizer

    def split(self, text: str) -> list[str]:
        """Return the non-blank windows of ``text``, in order."""
        spans = self._token_spans(text) if self.config.unit == "token" else self._char_spans(text)
        chunks = (text[start:end].strip() for start, end in spans)
        return [chunk for chunk in chunks if chunk]

    def _char_spans(self, text: str) -> list[tuple[int, int]]:
        size, overlap, n = self.config.size, self.config.overlap, len(text)
        spans: list[tuple[int, int]] = []
        start = 0
        while start < n:
            end = min(start + size, n)
            if end < n:
                end = _best_break(text, start + size // 2, end)
            spans.append((start, end))
            if end >= n:
                break
            # Always advance (a window never starts where the previous one did).
            start = max(_word_start(text, end - overlap, end), start + 1)
        return spans

    def _token_spans(self, text: str) -> list[tuple[int, int]]:
        encoded = self._tokenizer(
            text, add_special_tokens=False, return_offsets_mapping=True, verbose=False
        )
        offsets = encoded["offset_mapping"]
        size, step = self.config.size, self.config.size - self.config.overlap
        spans = []
        for first in range(0, len(offsets), step):
            last = min(first + size, len(offsets)) - 1
            spans.append((offsets[first][0], offsets[last][1]))
            if last == len(offsets) - 1:
                break
        return spans


def _best_break(text: str, lo: int, hi: int) -> int:
    """The end (exclusive) of the best break in ``text[lo:hi]``, or ``hi`` if there is none."""
    for sep in _BREAKS:
        pos = text.rfind(sep, lo, hi)
        if pos != -1:
            return pos + len(sep)
    return hi


def _word_start(text: str, pos: int, limit: int) -> int:
    """``pos`` moved forward to the start of a word (but not past ``limit``)."""
    pos = max(pos, 0)
    if pos == 0 or text[pos - 1].isspace():
        return pos
    space = next((i for i in range(pos, limit) if text[i].isspace()), None)
    return pos if space is None else space + 1
