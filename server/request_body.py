"""Request bodies decoded, parsed and validated; large ones in a parser process (`BodyParser`).

Bodies up to `INLINE_BODY_BYTES` are parsed on the event loop; larger ones in a parser process,
so megabytes of JSON never hold the GIL against the event loop and the engine thread. Strings
must be UTF-8 without lone surrogates (a 400 naming the field). `TokenIdPromptCheck` counts
token-id prompts before pydantic converts them. Why: docs/api.md, "Large inputs".
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from moe_serve.server.errors import APIError, ErrorCode, from_validation_errors
from moe_serve.server.token_bound import PromptLimit

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

INLINE_BODY_BYTES = 64 * 1024
PARSER_NICENESS = 10
PARENT_POLL_S = 1.0
# A lone surrogate can only come from a JSON escape (the body is decoded as strict UTF-8);
# bodies without one of these are not searched.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")

Precheck = Callable[[Any], None]


@dataclass(frozen=True)
class TokenIdPromptCheck:
    """A precheck: a token-id prompt (or batch entry) in the field `limit.param` that cannot fit
    is refused by its length, before pydantic converts a single id."""

    limit: PromptLimit

    def __call__(self, data: Any) -> None:
        prompt = data.get(self.limit.param) if isinstance(data, dict) else None
        if not isinstance(prompt, list) or not prompt:
            return
        for ids in prompt if isinstance(prompt[0], list) else [prompt]:
            if isinstance(ids, list) and ids and type(ids[0]) is int:
                self.limit.check(len(ids), exact=True)


def _has_lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _param(path: list[str | int]) -> str | None:
    """`["messages", 0, "content"]` -> `"messages[0].content"`."""
    param = ""
    for part in path:
        param += f"[{part}]" if isinstance(part, int) else (f".{part}" if param else part)
    return param or None


def lone_surrogate_path(value: Any) -> tuple[list[str | int], bool] | None:
    """Where the first lone surrogate is: (path, True when it is in a key under that path)."""
    stack: list[tuple[list[str | int], Any]] = [([], value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            if _has_lone_surrogate(item):
                return path, False
        elif isinstance(item, dict):
            if any(_has_lone_surrogate(key) for key in item):
                return path, True
            stack.extend((path + [key], child) for key, child in reversed(list(item.items())))
        elif isinstance(item, list):
            stack.extend((path + [index], child) for index, child in reversed(list(enumerate(item)))
                         if isinstance(child, (str, dict, list)))
    return None


def _surrogate_error(path: list[str | int], in_key: bool) -> APIError:
    param = _param(path)
    where = (f"a key of '{param}'" if param else "a key of the request body") if in_key else f"'{param}'"
    return APIError(400, f"Invalid value for {where}: the text contains a lone surrogate (a \\ud800-\\udfff "
                         "escape without its pair), which is not valid Unicode", code=ErrorCode.INVALID_VALUE,
                    param=param)


def parse_body(raw: bytes, model: type[M], precheck: Precheck | None = None) -> M:
    """`raw` as a validated `model`, or the OpenAI-shaped 400 that says what is wrong with it."""
    if not raw:
        raise APIError(400, "Missing required parameter: 'request body'", code=ErrorCode.MISSING_REQUIRED)
    try:
        text = raw.decode("utf-8")
        data = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise APIError(400, "the request body is not valid JSON", code=ErrorCode.INVALID_JSON) from exc
    if _SURROGATE_ESCAPE.search(text):
        found = lone_surrogate_path(data)
        if found is not None:
            raise _surrogate_error(*found)
    if precheck is not None:
        precheck(data)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise from_validation_errors(exc.errors()) from exc


def _exit_with(server_pid: int) -> None:
    """In the parser process: exit once the server is gone (killed, it cannot say so)."""
    while os.getppid() == server_pid:
        time.sleep(PARENT_POLL_S)
    os._exit(0)


def _start_parser_process(server_pid: int) -> None:
    """In the parser process: below the server's CPU priority (a body is worth less than a token of
    a running request), deaf to Ctrl-C, which reaches the whole process group (the server decides
    when to stop), and gone with the server."""
    os.nice(PARSER_NICENESS)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with, args=(server_pid,), name="parent-watch", daemon=True).start()


class BodyParser:
    """Parses request bodies: small ones inline, large ones in a parser process started on first use."""

    def __init__(self) -> None:
        self._executor: ProcessPoolExecutor | None = None

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            self._executor = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_start_parser_process, initargs=(os.getpid(),))
        return self._executor

    async def parse(self, request: Request, model: type[M], precheck: Precheck | None = None) -> M:
        raw = await request.body()
        if len(raw) <= INLINE_BODY_BYTES:
            return parse_body(raw, model, precheck)
        try:
            return await asyncio.wrap_future(self._pool().submit(parse_body, raw, model, precheck))
        except BrokenProcessPool:
            logger.warning("the body parser process died; the next large body starts a new one")
            self._executor = None
            raise

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
