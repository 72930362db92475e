"""Every failure becomes an OpenAI-shaped error with the right status."""

import json
import pickle

from ray.serve.exceptions import BackPressureError

from cluster.errors import InvalidRequestError, NotFoundError, OverloadedError
from serve.errors import create_error_response, to_ragtune_error


def _body(response):
    return json.loads(response.body)["error"]


def test_typed_errors_survive_pickling():
    err = pickle.loads(pickle.dumps(OverloadedError("busy", retry_after=3, status=503)))
    assert (err.status, err.retry_after, err.message) == (503, 3, "busy")
    nf = pickle.loads(pickle.dumps(NotFoundError("gone", param="model", code="model_not_found")))
    assert nf.to_dict() == {"error": {"message": "gone", "type": "not_found_error", "param": "model", "code": "model_not_found"}}


def test_wrapped_errors_are_unwrapped():
    class Wrapper(Exception):  # shaped like ray.exceptions.RayTaskError: the original is .cause
        def __init__(self, cause):
            super().__init__("wrapped")
            self.cause = cause

    err = to_ragtune_error(Wrapper(InvalidRequestError("too long", param="prompt")))
    assert isinstance(err, InvalidRequestError) and err.param == "prompt"


def test_backpressure_is_503_with_retry_after():
    response = create_error_response(BackPressureError(num_queued_requests=10, max_queued_requests=10))
    assert response.status_code == 503 and response.headers["Retry-After"] == "1"
    assert _body(response)["type"] == "rate_limit_error"


def test_unknown_exception_is_500_without_internals():
    response = create_error_response(RuntimeError("secret path /etc/x"), request_id="req-1")
    body = _body(response)
    assert response.status_code == 500 and "secret" not in body["message"] and "req-1" in body["message"]
    assert set(body) == {"message", "type", "param", "code"}
