"""OpenAI-shaped errors: the APIError exception, the JSON body, and the mapping from
engine errors, pydantic validation errors and Starlette HTTP errors to it.

Every error the server sends has the body `{"error": {"message", "type", "param", "code"}}`
with a string code (one derived from the status when none is given); validation problems are
400, never FastAPI's default 422.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from moe_serve.engine.errors import (
    ContextLengthExceededError,
    EngineDeadError,
    EngineError,
    InvalidParameter,
    InvalidRequestError,
    QueueFullError,
)

# The status a client that went away is logged with (nobody reads the response).
CLIENT_CLOSED_REQUEST = 499
# Loc elements pydantic adds for union members and wrappers, not field names.
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "function-after", "function-before"})


class ErrorType(str, enum.Enum):
    """The `type` field of an error body."""

    INVALID_REQUEST = "invalid_request_error"
    AUTHENTICATION = "authentication_error"
    NOT_FOUND = "not_found_error"
    RATE_LIMIT = "rate_limit_error"
    SERVER = "server_error"
    UNAVAILABLE = "service_unavailable_error"


class ErrorCode(str, enum.Enum):
    """The `code` field of an error body."""

    INVALID_REQUEST = "invalid_request"
    INVALID_VALUE = "invalid_value"
    INVALID_JSON = "invalid_json"
    MISSING_REQUIRED = "missing_required_parameter"
    UNKNOWN_PARAMETER = "unknown_parameter"
    UNSUPPORTED_PARAMETER = "unsupported_parameter"
    INVALID_TYPE = "invalid_type"
    INVALID_API_KEY = "invalid_api_key"
    MODEL_NOT_FOUND = "model_not_found"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
    REQUEST_TOO_LARGE = "request_too_large"
    REQUEST_TIMEOUT = "request_timeout"
    INVALID_HOST = "invalid_host"
    RATE_LIMIT_EXCEEDED = "rate_limit_exceeded"
    ENGINE_DEAD = "engine_dead"
    MODEL_LOADING = "model_loading"
    SERVER_SHUTTING_DOWN = "server_shutting_down"
    SERVER_ERROR = "server_error"


# The code of an error raised without one, by status (other 4xx: invalid_request, 5xx: server_error).
_STATUS_CODES = {
    400: ErrorCode.INVALID_VALUE,
    401: ErrorCode.INVALID_API_KEY,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    408: ErrorCode.REQUEST_TIMEOUT,
    413: ErrorCode.REQUEST_TOO_LARGE,
    429: ErrorCode.RATE_LIMIT_EXCEEDED,
}


def default_code(status_code: int) -> ErrorCode:
    """The code an error of `status_code` gets when it is raised without one."""
    if status_code in _STATUS_CODES:
        return _STATUS_CODES[status_code]
    return ErrorCode.INVALID_REQUEST if status_code < 500 else ErrorCode.SERVER_ERROR


class APIError(Exception):
    """An error to send to the client as an OpenAI-shaped JSON body."""

    def __init__(
        self,
        status_code: int,
        message: str,
        error_type: ErrorType = ErrorType.INVALID_REQUEST,
        code: ErrorCode | str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.error_type = error_type
        code = default_code(status_code) if code is None else code
        self.code = code.value if isinstance(code, ErrorCode) else code
        self.param = param
        self.headers = headers or {}

    def __reduce__(self) -> tuple[type[APIError], tuple[Any, ...]]:
        """Pickled with every field (it crosses from the body parser process)."""
        return APIError, (self.status_code, self.message, self.error_type, self.code, self.param, self.headers)

    def body(self) -> dict[str, Any]:
        """The JSON body `{"error": {...}}`."""
        return {
            "error": {"message": self.message, "type": self.error_type.value, "param": self.param, "code": self.code}
        }

    def to_response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers)


class ClientDisconnectedError(Exception):
    """The client closed the connection before the response was ready."""


def retry_after_header(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def from_engine_error(exc: EngineError, prompt_param: str | None = None) -> APIError:
    """The HTTP error for an exception the engine raised at its boundary, by its type; `param`
    is the exception's field, or `prompt_param` (the request's prompt field) for context length."""
    if isinstance(exc, ContextLengthExceededError):
        return APIError(400, str(exc), code=ErrorCode.CONTEXT_LENGTH_EXCEEDED, param=prompt_param)
    if isinstance(exc, InvalidParameter):
        return APIError(400, str(exc), code=ErrorCode.INVALID_VALUE, param=exc.param)
    if isinstance(exc, InvalidRequestError):
        return APIError(400, str(exc), code=exc.code)
    if isinstance(exc, QueueFullError):
        return APIError(429, str(exc), ErrorType.RATE_LIMIT, ErrorCode.RATE_LIMIT_EXCEEDED,
                        headers=retry_after_header(exc.retry_after_s))
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc), ErrorType.UNAVAILABLE, ErrorCode.ENGINE_DEAD)
    return APIError(500, str(exc), ErrorType.SERVER, exc.code)


def param_from_loc(loc: Sequence[int | str]) -> str | None:
    """`("body", "messages", 0, "content")` -> `"messages[0].content"` (union tags dropped)."""
    param = ""
    for part in loc:
        if part == "body" and not param:
            continue
        if isinstance(part, int):
            param += f"[{part}]"
        elif part in _TYPE_TAGS or "[" in part:
            continue
        else:
            param += f".{part}" if param else part
    return param or None


def from_validation_errors(errors: Sequence[Any]) -> APIError:
    """A 400 naming the first invalid field (pydantic or FastAPI request validation)."""
    if not errors:
        return APIError(400, "invalid request body", code=ErrorCode.INVALID_VALUE)
    first = errors[0]
    kind = str(first.get("type", ""))
    param = param_from_loc(first.get("loc", ()))
    if kind == "json_invalid":
        return APIError(400, "the request body is not valid JSON", code=ErrorCode.INVALID_JSON)
    if kind == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", code=ErrorCode.UNKNOWN_PARAMETER,
                        param=param)
    if kind == "missing":
        what = param or "request body"
        return APIError(400, f"Missing required parameter: '{what}'", code=ErrorCode.MISSING_REQUIRED, param=param)
    code = ErrorCode.UNSUPPORTED_PARAMETER if kind == "unsupported_parameter" else ErrorCode.INVALID_VALUE
    message = str(first.get("msg", "invalid value"))
    if param and kind != "unsupported_parameter":
        message = f"Invalid value for '{param}': {message}"
    return APIError(400, message, code=code, param=param)


async def _api_error_handler(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return exc.to_response()


async def _validation_handler(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    return from_validation_errors(exc.errors()).to_response()


async def _engine_error_handler(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, EngineError)
    return from_engine_error(exc).to_response()


async def _http_handler(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    error_type = ErrorType.NOT_FOUND if exc.status_code == 404 else ErrorType.INVALID_REQUEST
    return APIError(exc.status_code, str(exc.detail), error_type, headers=dict(exc.headers or {})).to_response()


async def _disconnected_handler(_request: Request, _exc: Exception) -> Response:
    return Response(status_code=CLIENT_CLOSED_REQUEST)


def internal_error() -> APIError:
    """The 500 of an exception nothing else handled (the middleware logs it)."""
    return APIError(500, "internal server error", ErrorType.SERVER, ErrorCode.SERVER_ERROR)


def install_error_handlers(app: FastAPI) -> None:
    """Make every error path of `app` answer in the OpenAI error shape (an unexpected exception
    becomes a 500 in `server.middleware.UnhandledErrorMiddleware`, inside the request-id one)."""
    app.add_exception_handler(APIError, _api_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(EngineError, _engine_error_handler)
    app.add_exception_handler(StarletteHTTPException, _http_handler)
    app.add_exception_handler(ClientDisconnectedError, _disconnected_handler)
