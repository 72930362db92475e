"""Every failure becomes an OpenAI-shaped error with the right status."""

import json
import pickle

from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException

from cluster.errors import InvalidRequestError, NotFoundError, OverloadedError
from serve.errors import create_error_response, to_ragtune_error, vllm_error_response


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


def test_vllm_error_response_passes_through_with_its_status():
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response as vllm_error
    from vllm.exceptions import VLLMValidationError

    answer = vllm_error(VLLMValidationError("prompt too long", parameter="input_tokens"))
    response = vllm_error_response(answer)
    assert response.status_code == 400 and _body(response)["param"] == "input_tokens"
    assert set(_body(response)) == {"message", "type", "param", "code"}
    assert vllm_error_response(object()) is None and vllm_error_response({"error": 1}) is None


def test_vllm_dead_engine_500_becomes_a_retryable_503():
    from http import HTTPStatus

    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response as vllm_error

    answer = vllm_error("EngineCore encountered an issue", err_type="EngineDeadError",
                        status_code=HTTPStatus.INTERNAL_SERVER_ERROR)
    response = vllm_error_response(answer)
    assert response.status_code == 503 and response.headers["Retry-After"] == "5"
    other = vllm_error("something broke", err_type="InternalServerError", status_code=HTTPStatus.INTERNAL_SERVER_ERROR)
    assert vllm_error_response(other).status_code == 500


def test_engine_death_is_503():
    class EngineDeadError(Exception):
        pass

    response = create_error_response(EngineDeadError("gone"))
    assert response.status_code == 503 and response.headers["Retry-After"] == "5"
    assert _body(response)["code"] == "engine_unavailable"


def test_http_exception_keeps_its_status_whatever_caused_it():
    # FastAPI answers an unparsable body with HTTPException(400) raised *from* the parse error
    # (ValueError for a 5,000-digit integer, RecursionError for deep nesting, UnicodeDecodeError).
    for cause in (ValueError("Exceeds the limit (4300 digits)"), RecursionError("too deep"),
                  UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")):
        try:
            try:
                raise cause
            except Exception as inner:
                raise HTTPException(status_code=400, detail="There was an error parsing the body") from inner
        except HTTPException as exc:
            response = create_error_response(exc)
        assert response.status_code == 400, (type(cause).__name__, _body(response))
        assert _body(response)["type"] == "invalid_request_error"
