"""``serve.<deployment>.node_labels``: a soft node preference (Ray label_selector + fallback to any node).

The two-node fault test (tests/faults/test_serve_node_loss.py) runs it on real raylets.
"""

from __future__ import annotations

import pytest

from cluster.config import load_config
from cluster.errors import ConfigError
from serve.config import DeploymentConfig


def test_no_labels_no_selector():
    opts = DeploymentConfig().serve_options()["ray_actor_options"]
    assert "label_selector" not in opts and "fallback_strategy" not in opts


def test_labels_are_preferred_with_a_fallback_to_any_node():
    opts = DeploymentConfig(node_labels={"ragtune-pool": "llm"}).serve_options()["ray_actor_options"]
    assert opts["label_selector"] == {"ragtune-pool": "llm"}
    assert opts["fallback_strategy"] == [{"label_selector": {}}]  # any node: a lost pool must not strand replicas
    assert opts["num_cpus"] == 0


def test_yaml_override_and_a_bad_value_names_the_field():
    cfg = load_config(None, ["serve.llm.node_labels={ragtune-pool: llm}", "serve.topology=split"])
    assert cfg.serve.llm.node_labels == {"ragtune-pool": "llm"}
    with pytest.raises(ConfigError, match=r"serve\.llm\.node_labels"):
        load_config(None, ["serve.llm.node_labels=[llm]"])
