"""AsyncLLMEngine: the engine loop in its own thread, with an asyncio face for the server.

The thread owns the model and the device; it builds the engine (the `build` callable it was
given, e.g. the builder's `build_engine`), then repeatedly drains its inbox (add/abort) and calls
LLMEngine.step(). Outputs cross back to the event loop with `loop.call_soon_threadsafe`. The event
loop never runs model code. After every step and every drained add/abort, the thread publishes
the engine's `EngineStats` snapshot; `stats()` returns the latest one.

A request that fails (its step raised, its logits were not finite) gets its error on its
own stream; the engine goes on. A load failure or a fatal fault stops the engine: every
waiting stream gets EngineDeadError, and `dead_reason` (one line) and `fatal_error` say why,
for the server to log once and exit non-zero (the thread itself logs them at DEBUG only).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from moe_serve.engine.config import EngineConfig
from moe_serve.engine.core.llm_engine import LLMEngine, describe_exception
from moe_serve.engine.core.request import EngineRequest, RequestOutput
from moe_serve.engine.core.stats import EngineStats
from moe_serve.engine.errors import EngineDeadError, EngineError, EngineStepError
from moe_serve.engine.offload.slot_pool import RESIDENCY_REFRESH_S

logger = logging.getLogger(__name__)

IDLE_POLL_S = 0.05


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException]

    def put(self, item: RequestOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncLLMEngine:
    """Thread-hosted engine; `generate` streams a request's outputs to async callers."""

    def __init__(self, config: EngineConfig, build: Callable[[EngineConfig], LLMEngine]) -> None:
        """`build(config)` runs on the engine thread and returns the engine it steps."""
        self.config = config
        self._build = build
        self._engine: LLMEngine | None = None
        self._stats: EngineStats | None = None
        self._inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self.load_error: BaseException | None = None
        self.fatal_error: BaseException | None = None
        self.dead_reason: str | None = None
        self._dead = False

    @classmethod
    def from_engine(cls, engine: LLMEngine, config: EngineConfig | None = None) -> AsyncLLMEngine:
        """Wrap an already-built engine (tests and benchmarks)."""
        return cls(config or EngineConfig(), lambda _cfg: engine)

    # -- lifecycle ---------------------------------------------------------------------
    def start(self, wait: bool = False, timeout: float | None = None) -> None:
        """Start the engine thread (it loads the model first); optionally wait until ready."""
        self._thread = threading.Thread(target=self._run, name="moe-serve-engine", daemon=True)
        self._thread.start()
        if wait:
            self._ready.wait(timeout)
            if self.load_error is not None:
                raise self.load_error

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop thread; waiting streams get an EngineDeadError."""
        self._stopping.set()
        self._inbox.put(("wake", None))
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def is_ready(self) -> bool:
        return self._ready.is_set() and self._engine is not None and not self._dead

    @property
    def is_dead(self) -> bool:
        return self._dead

    @property
    def engine(self) -> LLMEngine:
        if self._engine is None:
            raise EngineDeadError("the engine is not loaded")
        return self._engine

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def stats(self) -> EngineStats:
        """The snapshot the engine thread published last (safe on any thread)."""
        stats = self._stats
        if stats is None:
            raise EngineDeadError("the engine is not loaded")
        return stats

    # -- requests ----------------------------------------------------------------------
    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        """Queue `request` and yield its outputs; closing the iterator early aborts it."""
        if not self.is_ready:
            raise EngineDeadError("the engine is not running")
        self.engine.validate(request)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            self._streams[request.request_id] = stream
        self._inbox.put(("add", request))
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            with self._lock:
                self._streams.pop(request.request_id, None)
            if not finished:
                self.abort(request.request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request (no-op if it already finished); its KV blocks are freed at once."""
        self._inbox.put(("abort", request_id))

    # -- engine thread -----------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._engine = self._build(self.config)
            self._stats = self._engine.stats()
        except BaseException as exc:  # noqa: BLE001 - reported to the starter, never swallowed
            self.load_error = exc
            self._die("the model failed to load", exc)
            self._ready.set()
            return
        self._ready.set()
        try:
            self._loop(self._engine)
        except BaseException as exc:  # noqa: BLE001 - a fatal fault: the server logs dead_reason and exits
            self._die("the engine stopped after a fatal error", exc)
        finally:
            self._dead = True
            self._engine.close()
            self._fail_all(EngineDeadError(self.dead_reason or "the engine stopped"))

    def _die(self, what: str, exc: BaseException) -> None:
        """Record why the engine cannot go on (the server logs it once and exits non-zero)."""
        lines = str(exc).strip().splitlines()
        detail = lines[0] if isinstance(exc, EngineError) and lines else describe_exception(exc)
        self.fatal_error = exc
        self.dead_reason = f"{what}: {detail}"
        self._dead = True
        logger.debug("%s", self.dead_reason, exc_info=exc)

    def _loop(self, engine: LLMEngine) -> None:
        settle_at: float | None = None  # once idle: when to publish the snapshot once more
        while not self._stopping.is_set():
            block = not engine.has_unfinished
            if self._drain_inbox(engine, block):
                self._stats = engine.stats()
            elif block and settle_at is not None and time.monotonic() >= settle_at:
                self._stats = engine.stats()  # the residency lags the last step by up to its refresh period
                settle_at = None
            if not engine.has_unfinished:
                continue
            outputs = engine.step()
            self._stats = engine.stats()
            settle_at = time.monotonic() + RESIDENCY_REFRESH_S
            for output in outputs:
                self._deliver(output.request_id, output if output.error is None else output.error)

    def _drain_inbox(self, engine: LLMEngine, block: bool) -> bool:
        """Run the queued adds and aborts (waiting up to IDLE_POLL_S for one when `block`);
        whether there was any."""
        try:
            command, arg = self._inbox.get(timeout=IDLE_POLL_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return False
        while True:
            if command == "add":
                try:
                    engine.add_validated_request(arg)
                except EngineError as exc:
                    self._deliver(arg.request_id, exc)
                except Exception as exc:  # noqa: BLE001 - this request fails, the engine goes on
                    logger.warning("queueing request %s failed: %s", arg.request_id, exc, exc_info=exc)
                    engine.abort(arg.request_id)
                    self._deliver(arg.request_id, EngineStepError(f"queueing this request failed "
                                                                  f"({describe_exception(exc)})"))
            elif command == "abort":
                output = engine.abort(arg)
                if output is not None:
                    self._deliver(arg, output)
            try:
                command, arg = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        with self._lock:
            stream = self._streams.get(request_id)
        if stream is not None:
            stream.put(item)

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            streams = list(self._streams.values())
        for stream in streams:
            stream.put(exc)
