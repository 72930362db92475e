"""RetrievalConfig: defaults, strictness, errors naming the field, secrets."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from retrieval.config import MilvusConfig, RetrievalConfig, SearchConfig


def test_defaults_are_embedded_local():
    config = RetrievalConfig()
    assert config.milvus.uri == "./data/milvus.db" and config.milvus.token is None
    assert config.milvus.consistency_level == "Strong"
    assert config.embedder.model == "all-MiniLM-L6-v2"
    assert config.search.default_mode == "dense"


def test_every_field_has_a_description():
    def walk(model):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            annotation = field.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                walk(annotation)

    walk(RetrievalConfig)


def test_unknown_keys_are_errors():
    with pytest.raises(ValidationError, match="uri_typo"):
        RetrievalConfig.model_validate({"milvus": {"uri_typo": "x"}})


def test_token_is_secret():
    config = MilvusConfig(uri="http://milvus:19530", token="root:Milvus")
    assert "root:Milvus" not in repr(config) and "root:Milvus" not in config.model_dump_json()
    assert config.token.get_secret_value() == "root:Milvus"


def test_validator_messages_name_field_and_value():
    with pytest.raises(ValidationError, match=r"milvus.collection_prefix='9bad-' must match"):
        MilvusConfig(collection_prefix="9bad-")
    with pytest.raises(ValidationError, match=r"search.default_top_k=20 must not exceed search.max_top_k=10"):
        SearchConfig(default_top_k=20, max_top_k=10)
    with pytest.raises(ValidationError, match="consistency_level"):
        MilvusConfig(consistency_level="Sometimes")
