"""Bearer API-key check as ASGI middleware, so it runs before any body is parsed.

The key is compared in constant time. /v1 routes are protected; /health and /metrics
only when the server is told to protect them; /version and the OpenAPI pages never.
"""

from __future__ import annotations

import hmac

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from moe_serve.server.errors import APIError, ErrorCode, ErrorType

API_PREFIX = "/v1"
OPS_PATHS = frozenset({"/health", "/metrics", "/dashboard", "/dashboard/data"})
_BEARER = "bearer "


def key_matches(authorization: str | None, api_key: str) -> bool:
    """Whether an `Authorization` header carries `api_key` as a Bearer token (constant time)."""
    if authorization is None or not authorization[: len(_BEARER)].lower() == _BEARER:
        return False
    given = authorization[len(_BEARER):].strip()
    return hmac.compare_digest(given.encode("utf-8"), api_key.encode("utf-8"))


class ApiKeyMiddleware:
    """Answers 401 (OpenAI error shape) to protected requests without the right key."""

    def __init__(self, app: ASGIApp, api_key: str, protect_health_and_metrics: bool = False) -> None:
        self.app = app
        self.api_key = api_key
        self.protect_health_and_metrics = protect_health_and_metrics

    def is_protected(self, path: str) -> bool:
        if path == API_PREFIX or path.startswith(API_PREFIX + "/"):
            return True
        return self.protect_health_and_metrics and path.rstrip("/") in OPS_PATHS

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.is_protected(scope["path"]):
            await self.app(scope, receive, send)
            return
        authorization = Headers(scope=scope).get("authorization")
        if key_matches(authorization, self.api_key):
            await self.app(scope, receive, send)
            return
        message = (
            "You didn't provide an API key. Pass it as 'Authorization: Bearer YOUR_KEY'."
            if authorization is None
            else "Incorrect API key provided."
        )
        error = APIError(401, message, ErrorType.AUTHENTICATION, ErrorCode.INVALID_API_KEY,
                         headers={"WWW-Authenticate": "Bearer"})
        await error.to_response()(scope, receive, send)
