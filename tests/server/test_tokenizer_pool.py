"""The tokenizer pool: its answers equal the tokenizer's own, a short prompt is not queued
behind a long one, a prompt too long by its bytes is refused without waiting for a worker,
and no two threads share a tokenizer."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest

from moe_serve.engine.model.tokenizer_builder import build_byte_level_tokenizer
from moe_serve.server.errors import APIError
from moe_serve.server.token_bound import PromptLimit
from moe_serve.server.tokenizer_pool import SMALL_INPUT_CHARS, Lane, TokenizerPool, lane_for

LONG_TEXT = "the quick brown fox jumps over the lazy dog " * 10_000  # 440 KB: half a second to encode
ROOMY = PromptLimit(max_model_len=10**8, requested=None, param="prompt")


@dataclass
class _Engine:
    """What the pool reads of the engine."""

    tokenizer: Any


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return build_byte_level_tokenizer()


@pytest.fixture
def pool(tokenizer: Any) -> Any:
    pool = TokenizerPool(_Engine(tokenizer))  # type: ignore[arg-type]
    yield pool
    pool.shutdown()


def test_answers_are_the_tokenizers_own(pool: TokenizerPool, tokenizer: Any) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Hello, wörld!"}]

    async def run() -> tuple[list[int], list[int], list[str]]:
        return (await pool.render_chat(messages, ROOMY), await pool.encode("Hello there", ROOMY),
                await pool.token_texts([5, 6, 7]))

    chat, text, texts = asyncio.run(run())
    assert chat == tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=False)
    assert text == tokenizer.encode("Hello there")
    assert texts == [tokenizer.decode([i]) for i in (5, 6, 7)]


def test_inputs_take_the_lane_of_their_size() -> None:
    assert lane_for(10) is Lane.SMALL and lane_for(SMALL_INPUT_CHARS) is Lane.SMALL
    assert lane_for(SMALL_INPUT_CHARS + 1) is Lane.LARGE


def test_a_short_prompt_does_not_wait_behind_a_long_one(pool: TokenizerPool, tokenizer: Any) -> None:
    async def run() -> tuple[bool, list[int], list[int]]:
        long_task = asyncio.create_task(pool.encode(LONG_TEXT, ROOMY))
        await asyncio.sleep(0.05)  # the long one is encoding now
        short = await pool.render_chat([{"role": "user", "content": "hi"}], ROOMY)
        long_still_running = not long_task.done()
        return long_still_running, short, await long_task

    long_still_running, short, long_ids = asyncio.run(run())
    assert long_still_running, "the short prompt waited for the long one"
    assert short == tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=False)
    assert long_ids == tokenizer.encode(LONG_TEXT)


def test_a_prompt_too_long_by_its_bytes_is_refused_without_waiting_for_the_large_lane(pool: TokenizerPool) -> None:
    small = PromptLimit(max_model_len=256, requested=16, param="prompt")

    async def run() -> tuple[APIError, APIError, bool]:
        busy = asyncio.create_task(pool.encode(LONG_TEXT, ROOMY))  # holds the large lane for a while
        await asyncio.sleep(0.05)
        with pytest.raises(APIError) as text_error:
            await pool.encode("lorem ipsum " * 350_000, small)
        with pytest.raises(APIError) as chat_error:
            await pool.render_chat([{"role": "user", "content": "lorem ipsum " * 1_000}], small)  # small lane
        refused_first = not busy.done()
        await busy
        return text_error.value, chat_error.value, refused_first

    text_error, chat_error, refused_first = asyncio.run(run())
    assert refused_first, "the over-long text waited for the busy large lane"
    for error, param in ((text_error, "prompt"), (chat_error, "prompt")):
        assert (error.status_code, error.code, error.param) == (400, "context_length_exceeded", param)
        assert "at least" in error.message and "and 16 in the completion" in error.message


def test_each_worker_thread_has_its_own_tokenizer(pool: TokenizerPool, tokenizer: Any) -> None:
    async def run() -> list[Any]:
        return [await pool._run(lane, pool._tokenizer) for lane in (Lane.SMALL, Lane.LARGE, Lane.SMALL)]

    small, large, small_again = asyncio.run(run())
    assert small is small_again and small is not large
    assert tokenizer not in (small, large)  # never the engine's own (its thread decodes with it)
