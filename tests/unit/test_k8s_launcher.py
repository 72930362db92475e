"""cluster/launcher/*.yaml: valid for Ray's cluster launcher, pinned, token auth, project installed as the README says."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from tests.k8s_support import REPO, strict

LAUNCHERS = sorted((REPO / "cluster" / "launcher").glob("*.yaml"))


def _schema() -> dict:
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    # Unknown top-level keys and node-type keys are typos; node_config stays provider-specific.
    schema["additionalProperties"] = False
    node = schema["properties"]["available_node_types"]["patternProperties"][".*"]
    node["additionalProperties"] = False
    return schema


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_config_validates_against_rays_schema(path):
    config = yaml.safe_load(path.read_text())
    jsonschema.validate(config, _schema())
    assert path.read_text().startswith("#") and "ray up cluster/launcher/" in path.read_text().split("\n\n")[0]


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_is_pinned_authenticated_and_installs_the_project(path):
    config = yaml.safe_load(path.read_text())
    image = config["docker"]["image"]
    assert image.startswith(f"rayproject/ray:{ray.__version__}-py311-"), image
    starts = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert starts.count("RAY_AUTH_MODE=token ray start") == 2
    assert "--dashboard-host=127.0.0.1" in starts, "the dashboard stays on the head's loopback"
    assert any('-e "$HOME/ragtune[gpu]"' in c and "constraints.txt" in c for c in config["setup_commands"])
    assert config["file_mounts"]["~/ragtune"] == "."
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}


def test_strict_schema_helper_rejects_unknown_fields():
    schema = strict({"type": "object", "properties": {"a": {"type": "integer"}}})
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"a": 1, "b": 2}, schema)
