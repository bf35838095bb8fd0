"""Running the engine requests behind one HTTP request: n choices merged into one event
stream, accumulated per choice, and raced against the client going away.

Closing a MergedGeneration (or the client disconnecting) cancels every per-choice task;
each one closes its engine iterator, which aborts the request in the engine at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from fastapi import Request

from moe_serve.engine.core.request import EngineRequest, RequestOutput
from moe_serve.engine.core.sampling_params import FinishReason, TokenLogprob
from moe_serve.engine.errors import EngineError
from moe_serve.server.errors import ClientDisconnectedError, from_engine_error
from moe_serve.server.metrics import RequestTimer, ServerMetrics

if TYPE_CHECKING:
    from moe_serve.engine.core.async_engine import AsyncLLMEngine

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class _Done:
    """Marks the end of one choice's outputs."""


@dataclass(frozen=True)
class ChoiceEvent:
    """One engine output for the choice at `index`."""

    index: int
    output: RequestOutput


class MergedGeneration:
    """The outputs of several engine requests (one per choice) as one ordered stream."""

    def __init__(self, engine: AsyncLLMEngine, requests: list[EngineRequest], metrics: ServerMetrics) -> None:
        self._metrics = metrics
        self._queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | _Done]] = asyncio.Queue()
        self._remaining = len(requests)
        self._tasks = [
            asyncio.create_task(self._pump(engine, index, request), name=f"generate-{request.request_id}")
            for index, request in enumerate(requests)
        ]

    async def _pump(self, engine: AsyncLLMEngine, index: int, request: EngineRequest) -> None:
        timer = RequestTimer.start(request)
        try:
            async with contextlib.aclosing(engine.generate(request)) as outputs:
                async for output in outputs:
                    self._metrics.on_tokens(timer, timer.on_output(output, time.monotonic()))
                    self._queue.put_nowait((index, output))
        except asyncio.CancelledError:
            self._metrics.on_finished(timer)  # abandoned: counted as aborted
            raise
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            self._queue.put_nowait((index, exc))
        else:
            self._queue.put_nowait((index, _Done()))
            self._metrics.on_finished(timer)

    async def next_event(self) -> ChoiceEvent | None:
        """The next output of any choice; None once every choice has finished."""
        while self._remaining:
            index, item = await self._queue.get()
            if isinstance(item, _Done):
                self._remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                return ChoiceEvent(index, item)
        return None

    async def aclose(self) -> None:
        """Cancel whatever is still running (aborting it in the engine)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_until_disconnected(request: Request, work: Callable[[], Awaitable[T]]) -> T:
    """Await `work()`, cancelling it as soon as the client disconnects (ClientDisconnectedError)."""
    work_task = asyncio.ensure_future(work())
    watch_task = asyncio.create_task(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({work_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
        if work_task in done:
            return work_task.result()
        logger.info("client disconnected; aborting request %s", getattr(request.state, "request_id", "?"))
        raise ClientDisconnectedError()
    finally:
        for task in (work_task, watch_task):
            task.cancel()
        await asyncio.gather(work_task, watch_task, return_exceptions=True)


@dataclass
class ChoiceState:
    """Everything one choice has produced so far."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0

    def add(self, output: RequestOutput) -> None:
        self.text += output.new_text
        self.token_ids += output.new_token_ids
        self.logprobs += output.new_logprobs or []
        self.num_prompt_tokens = output.num_prompt_tokens
        self.num_output_tokens = max(self.num_output_tokens, output.num_output_tokens, len(self.token_ids))
        if output.finished:
            self.finish_reason = output.finish_reason


async def collect(generation: MergedGeneration, first: ChoiceEvent | None, num_choices: int) -> list[ChoiceState]:
    """Drain `generation` (starting with the already-taken `first` event) into per-choice states."""
    choices = [ChoiceState(i) for i in range(num_choices)]
    event = first
    while event is not None:
        choices[event.index].add(event.output)
        event = await generation.next_event()
    return choices


async def start_generation(
    engine: AsyncLLMEngine, request: Request, requests: list[EngineRequest], prompt_param: str
) -> tuple[MergedGeneration, ChoiceEvent | None]:
    """Submit `requests` and wait for the first output, so that engine errors (a value the
    engine's validation rejects, context length, queue full, ...) become HTTP errors before any
    response byte is sent."""
    generation = MergedGeneration(engine, requests, request.app.state.request_metrics)
    try:
        first = await run_until_disconnected(request, generation.next_event)
    except EngineError as exc:
        await generation.aclose()
        raise from_engine_error(exc, prompt_param) from exc
    except BaseException:
        await generation.aclose()
        raise
    return generation, first
