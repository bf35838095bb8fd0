"""Runs the HTTP server: engine thread + FastAPI app under uvicorn, graceful on SIGTERM.

uvicorn stops accepting on SIGTERM/SIGINT and lets running requests finish for up to
`shutdown_timeout_s`; then the engine thread is stopped and the process exits 0.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

import uvicorn

from engine.async_engine import AsyncLLMEngine
from engine.builder import resolve_device, served_model_name
from server.app import ServerOptions, create_app
from server.config import ServeConfig

logger = logging.getLogger(__name__)


def _drained(_signum: int, _frame: FrameType | None) -> None:
    """uvicorn re-raises SIGTERM after its graceful shutdown; by then there is nothing left to do."""


def serve(config: ServeConfig) -> int:
    """Block serving HTTP until a shutdown signal; returns the process exit code."""
    resolve_device(config.device)  # refuse at once (one line, exit 1) when CUDA is asked for but absent
    engine = AsyncLLMEngine(config)
    engine.start()
    options = ServerOptions(api_key=config.api_key, served_model_name=served_model_name(config))
    app = create_app(engine, options)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_level=config.log_level.value,
            timeout_graceful_shutdown=int(config.shutdown_timeout_s),
            access_log=False,
        )
    )
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _drained) if in_main_thread else None
    try:
        server.run()
    finally:
        engine.shutdown()
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    if engine.load_error is not None:
        logger.error("the model failed to load: %s", engine.load_error)
        return 1
    return 0
