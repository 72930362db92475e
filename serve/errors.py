"""One helper makes every error OpenAI-shaped: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import json
import logging

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from cluster.errors import InvalidRequestError, OverloadedError, RagtuneError

__all__ = ["create_error_response", "to_ragtune_error", "validation_error", "vllm_error_response"]

logger = logging.getLogger(__name__)

_HTTP_TYPES = {404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error"}


def _unwrap(exc: BaseException) -> BaseException:
    """Ray wraps replica exceptions (RayTaskError); find our typed error inside if there is one."""
    seen = 0
    # An HTTP or validation error already says what the client did wrong; what caused it
    # (FastAPI raises its body-parse 400 `from` the ValueError) is not the answer.
    while seen < 5 and not isinstance(exc, RagtuneError | HTTPException | RequestValidationError):
        inner = getattr(exc, "cause", None) or exc.__cause__
        if inner is None:
            break
        exc, seen = inner, seen + 1
    return exc


def validation_error(exc: RequestValidationError) -> InvalidRequestError:
    """Pydantic/JSON errors → a 400 that names the field and says why."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return InvalidRequestError(f"Request body is not valid JSON: {first.get('msg')}", code="invalid_json")
    param = ".".join(loc) or None
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return InvalidRequestError(f"{param or 'body'}: {first.get('msg')}{more}", param=param)


def to_ragtune_error(exc: BaseException, request_id: str | None = None) -> RagtuneError:
    """Map any exception to a typed error; unknown ones become a 500 without internals."""
    from ray.serve.exceptions import BackPressureError

    exc = _unwrap(exc)
    if isinstance(exc, RagtuneError):
        return exc
    if isinstance(exc, RequestValidationError):
        return validation_error(exc)
    if isinstance(exc, json.JSONDecodeError):
        return InvalidRequestError(f"Request body is not valid JSON: {exc}", code="invalid_json")
    if _engine_down(exc):
        logger.warning("request %s: engine unavailable: %s", request_id, type(exc).__name__)
        return engine_unavailable()
    if isinstance(exc, BackPressureError):
        return OverloadedError("The server is overloaded (queue full); retry later.", status=503, retry_after=1)
    if isinstance(exc, HTTPException):
        err = RagtuneError(str(exc.detail))
        err.status, err.type = exc.status_code, _HTTP_TYPES.get(exc.status_code, "invalid_request_error")
        return err
    logger.error("request %s failed: %s", request_id, type(exc).__name__, exc_info=exc)
    return RagtuneError(f"Internal server error (request id {request_id}).", code="internal_error")


def engine_unavailable() -> OverloadedError:
    """The 503 for a dead or restarting engine: retryable, with ``Retry-After``."""
    return OverloadedError("The model replica is unavailable (restarting); retry later.", status=503,
                           retry_after=5, code="engine_unavailable")


def _engine_down(exc: BaseException) -> bool:
    """A dead engine-core process or replica actor: the client should retry, not give up (503)."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError
    from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

    names = {type(e).__name__ for e in (exc, exc.__cause__, exc.__context__) if e is not None}
    if names & {"EngineDeadError", "EngineGenerateError"}:
        return True
    return isinstance(exc, ActorDiedError | ActorUnavailableError | DeploymentUnavailableError | ReplicaUnavailableError)


def vllm_error_response(answer: object) -> JSONResponse | None:
    """vLLM's ``ErrorResponse`` as HTTP (already OpenAI-shaped); None for anything else."""
    error = getattr(answer, "error", None)
    if error is None or not hasattr(error, "code") or not hasattr(answer, "model_dump"):
        return None
    status = int(error.code)
    headers = None
    text = f"{error.type} {error.message}".lower()
    if status >= 500 and ("enginedead" in text or "engine core" in text or "dead" in text):
        status, headers = 503, {"Retry-After": "5"}  # vLLM says 500 for a dead engine: a retryable outage
    return JSONResponse(answer.model_dump(), status_code=status, headers=headers)


def create_error_response(exc: BaseException, request_id: str | None = None) -> JSONResponse:
    """The HTTP response for ``exc``: right status, OpenAI body, Retry-After when overloaded."""
    err = to_ragtune_error(exc, request_id)
    headers = {"Retry-After": str(err.retry_after)} if isinstance(err, OverloadedError) else None
    return JSONResponse(err.to_dict(), status_code=err.status, headers=headers)
