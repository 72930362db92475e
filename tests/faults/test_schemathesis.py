"""Property-based requests against the served OpenAPI document: no input is a server error.

schemathesis reads the app's own ``/openapi.json`` and generates requests from it (paths,
parameters, bodies where the schema declares one), with an admin key so every route's logic runs.
In-process (ASGI) over the real Ingress with the fake engine and the in-memory store, so it runs in
seconds and belongs to the default ``make test`` as well as ``make faults``.
Run: .venv/bin/pytest -q tests/faults/test_schemathesis.py
"""

from __future__ import annotations

from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.test_ingress import _app, _h, _retriever


@pytest.fixture(scope="module")
def asgi_app(tmp_path_factory, tiny_model, adapter_dirs):
    app = _app(tmp_path_factory.mktemp("schemathesis"), tiny_model, adapter_dirs, retriever=_retriever())
    return app.client.app


def _strategies(schema):
    # schemathesis's pytest plugin (from_fixture) does not run under this pytest; drawing each
    # operation's hypothesis strategy by hand is the documented lower-level API.
    return [result.ok().as_strategy() for result in schema.get_all_operations()]


def test_no_input_is_a_server_error(asgi_app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", asgi_app)
    strategies = _strategies(schema)
    assert len(strategies) >= 15, "the document must list the API's routes"
    failures, calls = [], []

    @given(st.one_of(strategies))
    @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def run(case):
        response = case.call(headers={**_h(), "Host": "127.0.0.1"})
        calls.append(response.status_code)
        if response.status_code >= 500:
            failures.append((case.method, case.formatted_path, response.status_code, response.text[:200]))

    run()
    print(f"schemathesis: {len(strategies)} operations, {len(calls)} calls, statuses {sorted(Counter(calls).items())}")
    assert len(calls) >= 100 and not failures, failures[:5]
