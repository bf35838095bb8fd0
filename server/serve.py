"""Runs the HTTP server (the engine thread and the FastAPI app under uvicorn) and owns the
process's lifecycle around it, so that a supervisor can rely on the exit code:

- Before the port is bound, the checks that read no weights run (model directory, config.json,
  a supported architecture): a failure is one line and exit 1, like `moe-serve generate`.
- The model then loads in the background while /health answers "loading". If loading fails, or
  the engine later stops on a fatal fault, the server logs one ERROR line with the engine's
  reason, ends the streams in flight (an error event and `[DONE]`) and the process exits 1.
- SIGTERM or SIGINT starts the drain (server/drain.py): the port stays open, new requests get 503
  with Retry-After, running ones have `shutdown_timeout_s` to finish and are then cut; the engine
  stops and the process exits 0. A second signal exits at once, with 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import signal
import threading
from collections.abc import Iterator
from types import FrameType

import uvicorn

from moe_serve.engine.builder import build_async_engine, model_path, resolve_device, served_model_name
from moe_serve.engine.config import EngineConfig
from moe_serve.engine.core.async_engine import AsyncLLMEngine
from moe_serve.engine.model.loader import read_spec
from moe_serve.server.app import ServerOptions, create_app
from moe_serve.server.config import ServeConfig
from moe_serve.server.drain import DrainState

logger = logging.getLogger(__name__)

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# After a fatal engine fault, how long the streams in flight have to send their error event.
FATAL_FLUSH_S = 5.0
# How long cut requests have to send their last bytes (a client that stopped reading cannot hold the exit).
CUT_TIMEOUT_S = 2.0
# uvicorn's wait for connections once the drain is over (only idle keep-alive ones are left).
CLOSE_TIMEOUT_S = 5
# Joining the engine thread after a second signal: the process exits without waiting for a step.
FORCED_ENGINE_JOIN_S = 0.5


class ExitCode(enum.IntEnum):
    """How `moe-serve serve` ends."""

    OK = 0  # drained after a signal
    FAILED = 1  # a start-up failure, a fatal engine fault, or a second signal during the drain


class LifecycleServer(uvicorn.Server):
    """uvicorn with moe-serve's lifecycle (see the module docstring): a first signal drains with
    the listening socket still open, a second exits at once, a dead engine stops the server."""

    def __init__(self, config: uvicorn.Config, engine: AsyncLLMEngine, drain: DrainState, grace_s: float) -> None:
        super().__init__(config)
        self.engine = engine
        self.drain = drain
        self.grace_s = grace_s
        self.exit_code = ExitCode.OK
        self.num_signals = 0
        self._ending: asyncio.Task[None] | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Like uvicorn's, but the signal is not raised again afterwards: the exit code says how it ended."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in HANDLED_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Signal handler: counts, and `on_tick` acts (before the server started, it just stops)."""
        self.num_signals += 1
        if not self.started:
            self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        if self.num_signals > 1:
            logger.warning("second signal: ending %d running request(s) now", self.drain.num_running)
            self.exit_code = ExitCode.FAILED
            await self.drain.cut(CUT_TIMEOUT_S)
            self.force_exit = True
            return True
        if self.engine.is_dead and self.exit_code is ExitCode.OK:
            self.exit_code = ExitCode.FAILED
            logger.error("%s; exiting", self.engine.dead_reason or "the engine stopped")
            self._end(FATAL_FLUSH_S)
        elif self.num_signals:
            self._end(self.grace_s)
        return False

    def _end(self, grace_s: float) -> None:
        if self._ending is None:
            self._ending = asyncio.create_task(self._drain_then_exit(grace_s))

    async def _drain_then_exit(self, grace_s: float) -> None:
        self.drain.begin(grace_s)
        if self.exit_code is ExitCode.OK:
            logger.info("draining: %d running request(s) have %.0f s to finish; new requests get 503",
                        self.drain.num_running, grace_s)
        if not await self.drain.wait_idle(grace_s):
            logger.warning("grace period over: ending %d running request(s) with server_shutting_down",
                           self.drain.num_running)
            await self.drain.cut(CUT_TIMEOUT_S)
        self.should_exit = True


def check_model(config: EngineConfig) -> None:
    """The loader's checks that read no weights (ModelLoadError): cheap, so they run before the
    port is bound. The bundled demo model (no --model) is built by the engine thread instead."""
    if config.model is not None:
        read_spec(model_path(config))


def default_torch_threads() -> int:
    """The server's torch CPU threads when --num-threads is not given: every core this process may
    run on but one, which the event loop, the tokenizer threads and local clients need. With all
    cores the model's threads and the event loop take turns on the same cores, and a decode step
    of 4-7 sequences went from ~35 ms to ~640 ms on a loaded 2-core machine (docs/scheduling.md)."""
    return max(1, len(os.sched_getaffinity(0)) - 1)


def serve(config: ServeConfig) -> int:
    """Serve HTTP until a shutdown signal or a fatal engine fault; returns the process exit code."""
    resolve_device(config.device)  # refuse at once (one line, exit 1) when CUDA is asked for but absent
    check_model(config)
    if config.num_threads is None:
        config = config.model_copy(update={"num_threads": default_torch_threads()})
    engine = build_async_engine(config)
    engine.start()
    return run_server(engine, config)


def run_server(engine: AsyncLLMEngine, config: ServeConfig) -> int:
    """Serve `engine` (started by the caller) until a signal or a fatal engine fault, then stop the
    engine; returns the exit code. Signals are handled only when called from the main thread."""
    options = ServerOptions(
        api_key=config.api_key, served_model_name=served_model_name(config),
        max_request_bytes=config.max_request_bytes, request_timeout_s=config.request_timeout_s,
        allowed_hosts=config.allowed_hosts, docs=config.docs,
        protect_health_and_metrics=config.auth_health_and_metrics,
    )
    app = create_app(engine, options)
    server = LifecycleServer(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_level=config.log_level.value,
            timeout_graceful_shutdown=CLOSE_TIMEOUT_S,
            access_log=False,
        ),
        engine,
        app.state.drain,
        config.shutdown_timeout_s,
    )
    try:
        server.run()
    finally:
        if server.force_exit:
            engine.shutdown(FORCED_ENGINE_JOIN_S)
        else:
            engine.shutdown()
    return int(server.exit_code)
