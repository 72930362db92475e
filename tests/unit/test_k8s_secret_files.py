"""cluster/secret_files.py: config fields from mounted Secret files, with errors that name the field."""

from __future__ import annotations

import pytest

from cluster.errors import ConfigError
from cluster.secret_files import apply_secret_files


def test_text_and_yaml_files_set_nested_fields_without_touching_the_input(tmp_path):
    (tmp_path / "token").write_text("user:pw\n")
    (tmp_path / "keys.yaml").write_text("- {sha256: abc, tenant: t}\n")
    config = {"serve": {"http": {"port": 8000}}}
    out = apply_secret_files(config, {
        "retrieval.milvus.token": {"path": str(tmp_path / "token")},
        "serve.auth.keys": {"path": str(tmp_path / "keys.yaml"), "format": "yaml"},
    })
    assert out["retrieval"]["milvus"]["token"] == "user:pw"
    assert out["serve"]["auth"]["keys"] == [{"sha256": "abc", "tenant": "t"}]
    assert out["serve"]["http"] == {"port": 8000} and "auth" not in config["serve"]


@pytest.mark.parametrize(("content", "fmt", "message"), [
    ("", "text", r"serve\.auth\.keys: .* is empty"),
    ("[]\n", "yaml", r"serve\.auth\.keys: .* is empty"),
    ("- {a: [\n", "yaml", r"serve\.auth\.keys: .* is not valid YAML"),
])
def test_bad_files_fail_naming_the_field(tmp_path, content, fmt, message):
    path = tmp_path / "f"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        apply_secret_files({}, {"serve.auth.keys": {"path": str(path), "format": fmt}})


def test_bad_specs_fail_naming_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"secret_files\.serve\.auth\.keys"):
        apply_secret_files({}, {"serve.auth.keys": {"path": "/x", "format": "json"}})
    with pytest.raises(ConfigError, match="is not a mapping"):
        (tmp_path / "t").write_text("x")
        apply_secret_files({"serve": 3}, {"serve.auth.keys": {"path": str(tmp_path / "t")}})


def test_no_secret_files_is_a_plain_copy():
    assert apply_secret_files({"a": {"b": 1}}, None) == {"a": {"b": 1}}
