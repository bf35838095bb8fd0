"""The FastAPI application factory: `create_app(engine, options)`.

It wires the routes, the OpenAI-shaped error handlers, the middleware (request id, unhandled
errors, allowed hosts, shutdown drain, API key, body size and time limits), a per-app Prometheus
registry, and the body-parser and tokenizer threads (optionally the /docs page).
Importing this module does not import torch; the engine owns all model work.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, ProcessCollector

from moe_serve.server.auth import ApiKeyMiddleware
from moe_serve.server.config import DEFAULT_MAX_REQUEST_BYTES, DEFAULT_REQUEST_TIMEOUT_S
from moe_serve.server.context import ServingContext
from moe_serve.server.dashboard import build_dashboard_router
from moe_serve.server.docs_ui import install_docs
from moe_serve.server.drain import DrainMiddleware, DrainState
from moe_serve.server.errors import install_error_handlers
from moe_serve.server.metrics import register_metrics
from moe_serve.server.middleware import (
    AllowedHostsMiddleware,
    RequestBodyMiddleware,
    RequestIdMiddleware,
    UnhandledErrorMiddleware,
)
from moe_serve.server.request_body import BodyParser
from moe_serve.server.routes import build_router, document_request_bodies
from moe_serve.server.tokenizer_pool import TokenizerPool

if TYPE_CHECKING:
    from moe_serve.engine.core.async_engine import AsyncLLMEngine

logger = logging.getLogger(__name__)


def package_version() -> str:
    """The installed moe-serve version (or a marker when running from a source tree)."""
    try:
        return importlib.metadata.version("moe-serve")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0+source"


@dataclass
class ServerOptions:
    """HTTP-level settings of one app."""

    served_model_name: str
    api_key: str | None = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    version: str = field(default_factory=package_version)
    protect_health_and_metrics: bool = False
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S
    allowed_hosts: list[str] | None = None
    docs: bool = False


def create_app(engine: AsyncLLMEngine, options: ServerOptions) -> FastAPI:
    """A FastAPI app serving `engine` (started by the caller) under the OpenAI API."""
    ctx = ServingContext(engine=engine, served_model_name=options.served_model_name,
                         tokenizer=TokenizerPool(engine), bodies=BodyParser())
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)  # process_resident_memory_bytes, open fds, CPU seconds

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        ctx.shutdown()

    app = FastAPI(
        title="moe-serve",
        version=options.version,
        description="OpenAI-compatible serving of Mixture-of-Experts models.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.serving = ctx
    app.state.drain = DrainState()  # shared with the server's lifecycle (server/serve.py)
    app.state.metrics_registry = registry
    app.state.request_metrics = register_metrics(registry, engine, options.served_model_name, options.version)
    install_error_handlers(app)
    app.include_router(build_router(ctx, options.version, registry))
    app.include_router(build_dashboard_router(engine, app.state.request_metrics, options.served_model_name))
    document_request_bodies(app)
    if options.docs:
        install_docs(app)
    app.add_middleware(RequestBodyMiddleware, max_bytes=options.max_request_bytes,
                       timeout_s=options.request_timeout_s)
    if options.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=options.api_key,
                           protect_health_and_metrics=options.protect_health_and_metrics)
    app.add_middleware(DrainMiddleware, state=app.state.drain, served_model_name=options.served_model_name)
    if options.allowed_hosts:
        app.add_middleware(AllowedHostsMiddleware, allowed_hosts=options.allowed_hosts)
    app.add_middleware(UnhandledErrorMiddleware)
    app.add_middleware(RequestIdMiddleware)
    logger.info("serving model %r (API key %s)", options.served_model_name,
                "required" if options.api_key else "not required")
    return app
