"""Embedding precision: which side runs in bf16, and a real check that bf16 vectors stay near fp32."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from retrieval.bench import _settings
from retrieval.config import EmbedderConfig
from retrieval.embedder import cpu_has_native_bf16, resolve_precision


@pytest.mark.parametrize(
    ("setting", "device", "native", "expected"),
    [
        ("auto", "cpu", True, "bf16"),
        ("auto", "cpu", False, "fp32"),  # emulated bf16 is slower than fp32
        ("auto", "cuda", True, "bf16"),
        ("auto", "cuda", False, "fp32"),
        ("auto", "mps", True, "fp32"),
        ("fp32", "cpu", True, "fp32"),
        ("bf16", "cpu", False, "bf16"),  # asked for explicitly: honoured
    ],
)
def test_resolve_precision(setting, device, native, expected):
    assert resolve_precision(setting, device, native) == expected


def test_resolve_precision_rejects_unknown():
    with pytest.raises(ValueError, match="'int8'"):
        resolve_precision("int8", "cpu", True)


def test_native_bf16_flags():
    assert cpu_has_native_bf16({"avx512_bf16": True, "amx_bf16": False})
    assert cpu_has_native_bf16({"amx_bf16": True})
    assert cpu_has_native_bf16({"bf16": True})  # ARM
    assert not cpu_has_native_bf16({"avx2": True, "avx512_f": True})
    assert not cpu_has_native_bf16({})


def test_precision_config_defaults_and_errors():
    config = EmbedderConfig()
    assert (config.query_precision, config.document_precision) == ("auto", "fp32")
    with pytest.raises(ValidationError, match="query_precision"):
        EmbedderConfig(query_precision="int8")
    with pytest.raises(ValidationError, match="document_precision"):
        EmbedderConfig(document_precision="fp16")


def test_bench_settings_names():
    settings = _settings("fp32, bf16", "fp32")
    assert list(settings) == ["q=fp32 d=fp32", "q=bf16 d=fp32"]
    assert settings["q=bf16 d=fp32"].query_precision == "bf16"
    with pytest.raises(ValidationError, match="query_precision"):
        _settings("fp64", "fp32")


TEXTS = [
    "How many passengers does the Marrowgale carry?",
    "refund policy for cancelled ferry crossings",
    "Which Verrin Lake ferry is the only one with a bicycle deck?",
    "The festival runs for three days every August and the late boats leave at midnight.",
    "x",
]


@pytest.fixture(scope="module")
def bf16_queries():
    """The packaged all-MiniLM-L6-v2 (local, no hub) with bf16 queries and fp32 documents."""
    from retrieval.embedder import Embedder

    return Embedder(EmbedderConfig(device="cpu", query_precision="bf16", document_precision="fp32"))


def test_bf16_query_vectors_match_fp32(bf16_queries):
    # MiniLM has no prompts, so encode (fp32 documents) and encode_queries (bf16) embed the same text.
    assert bf16_queries.prompts[:2] == ("", "")
    fp32 = np.asarray(bf16_queries.encode(TEXTS))
    bf16 = np.asarray(bf16_queries.encode_queries(TEXTS))
    assert bf16.dtype == np.float64 and bf16.shape == (len(TEXTS), bf16_queries.dim)
    np.testing.assert_allclose(np.linalg.norm(bf16, axis=1), 1.0, atol=1e-5)
    cosine = np.sum(fp32 * bf16, axis=1)
    assert cosine.min() >= 0.999, cosine
    # bf16 really ran: the vectors are near, not equal (equal would mean autocast was not applied).
    assert np.abs(fp32 - bf16).max() > 1e-6


def test_fp32_is_the_unchanged_path(bf16_queries):
    fp32 = np.asarray(bf16_queries.model.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True))
    np.testing.assert_allclose(np.asarray(bf16_queries.encode(TEXTS)), fp32, rtol=0, atol=1e-6)
    assert bf16_queries.encode([]) == [] and bf16_queries.encode_queries([]) == []
