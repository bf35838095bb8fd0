"""The HTTP routes: OpenAI endpoints under /v1 (chat, completions, responses, models), plus
/health, /version and /metrics.

The /v1 POST routes parse their bodies themselves (`ServingContext.bodies`: large ones off the
event loop), so their request schemas are added to the OpenAPI document by
`document_request_bodies` rather than by FastAPI's body parameters.
"""

from __future__ import annotations

import enum
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from moe_serve.server.chat import create_chat_completion
from moe_serve.server.completions import create_completion, token_id_precheck
from moe_serve.server.context import ServingContext
from moe_serve.server.protocol import ChatCompletionRequest, CompletionRequest
from moe_serve.server.responses import ChatCompletionResponse, CompletionResponse, ModelCard, ModelList, now
from moe_serve.server.responses_api import ResponseStore, create_response
from moe_serve.server.responses_protocol import ResponsesRequest

_STREAM_DOC = {"content": {"text/event-stream": {}}, "description": "JSON body, or SSE chunks when stream is true"}
_ERROR_DOC = {"description": 'OpenAI error body: {"error": {"message", "type", "param", "code"}}'}
_SCHEMAS_REF = "#/components/schemas/{model}"
REQUEST_MODELS: tuple[type[BaseModel], ...] = (ChatCompletionRequest, CompletionRequest, ResponsesRequest)


def _request_body_doc(model: type[BaseModel]) -> dict[str, Any]:
    schema = {"$ref": _SCHEMAS_REF.format(model=model.__name__)}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def document_request_bodies(app: FastAPI) -> None:
    """Put the request models' JSON schemas into `app`'s OpenAPI document."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        fresh = app.openapi_schema is None
        document = generate()
        if fresh:
            _, definitions = models_json_schema([(model, "validation") for model in REQUEST_MODELS],
                                                ref_template=_SCHEMAS_REF)
            document.setdefault("components", {}).setdefault("schemas", {}).update(definitions.get("$defs", {}))
        return document

    app.openapi = openapi  # type: ignore[method-assign]


class HealthStatus(str, enum.Enum):
    """What /health reports."""

    OK = "ok"
    LOADING = "loading"
    DEAD = "dead"
    DRAINING = "draining"


def health_body(ctx: ServingContext) -> tuple[int, dict[str, Any]]:
    """(status code, JSON body): 200 with queue and KV stats when ready, else 503."""
    engine = ctx.engine
    if engine.is_dead:
        return 503, {"status": HealthStatus.DEAD.value, "model": ctx.served_model_name}
    if not engine.is_ready:
        return 503, {"status": HealthStatus.LOADING.value, "model": ctx.served_model_name}
    stats = engine.stats()
    return 200, {
        "status": HealthStatus.OK.value,
        "model": ctx.served_model_name,
        "num_running": stats.num_running,
        "num_waiting": stats.num_waiting,
        "kv_cache_usage": stats.kv_cache_usage,
    }


def build_router(ctx: ServingContext, version: str, registry: CollectorRegistry) -> APIRouter:
    """Every route of the server, bound to `ctx`."""
    router = APIRouter()
    created = now()
    stored_responses = ResponseStore()
    errors: dict[int | str, dict[str, Any]] = {code: _ERROR_DOC for code in (400, 401, 404, 408, 413, 429, 503)}

    @router.post("/v1/chat/completions", tags=["openai"], openapi_extra=_request_body_doc(ChatCompletionRequest),
                 responses={200: {"model": ChatCompletionResponse, **_STREAM_DOC}, **errors})
    async def chat_completions(request: Request) -> Response:
        """Chat completion (OpenAI-compatible)."""
        body = await ctx.bodies.parse(request, ChatCompletionRequest)
        return await create_chat_completion(ctx, body, request)

    @router.post("/v1/completions", tags=["openai"], openapi_extra=_request_body_doc(CompletionRequest),
                 responses={200: {"model": CompletionResponse, **_STREAM_DOC}, **errors})
    async def completions(request: Request) -> Response:
        """Text completion (OpenAI-compatible, legacy)."""
        body = await ctx.bodies.parse(request, CompletionRequest, token_id_precheck(ctx))
        return await create_completion(ctx, body, request)

    @router.post("/v1/responses", tags=["openai"], openapi_extra=_request_body_doc(ResponsesRequest),
                 responses={200: {"description": "a response object, or SSE events when stream is true",
                                  "content": {"text/event-stream": {}}}, **errors})
    async def responses(request: Request) -> Response:
        """Create a model response (the Responses API)."""
        body = await ctx.bodies.parse(request, ResponsesRequest)
        return await create_response(ctx, stored_responses, body, request)

    @router.get("/v1/responses/{response_id}", tags=["openai"], responses={404: _ERROR_DOC})
    async def retrieve_response(response_id: str) -> JSONResponse:
        """A stored response by id."""
        return JSONResponse(stored_responses.get(response_id).body)

    @router.get("/v1/models", tags=["openai"], response_model=ModelList)
    async def list_models() -> ModelList:
        """The one served model."""
        return ModelList(data=[ModelCard(id=ctx.served_model_name, created=created)])

    @router.get("/v1/models/{model}", tags=["openai"], response_model=ModelCard, responses={404: _ERROR_DOC})
    async def retrieve_model(model: str) -> ModelCard:
        """One model by id (404 for any id but the served one)."""
        ctx.check_model(model)
        return ModelCard(id=ctx.served_model_name, created=created)

    @router.get("/health", tags=["ops"], responses={503: {"description": "loading or the engine died"}})
    async def health() -> JSONResponse:
        """200 when the model is loaded and the engine runs; 503 otherwise. Carries queue stats."""
        status, body = health_body(ctx)
        return JSONResponse(body, status_code=status)

    @router.get("/version", tags=["ops"])
    async def get_version() -> dict[str, str]:
        """The server's version."""
        return {"version": version}

    @router.get("/metrics", tags=["ops"], response_class=Response)
    async def metrics() -> Response:
        """Prometheus exposition of this server's registry."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return router

