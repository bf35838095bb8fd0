"""Request bodies: strict UTF-8 text (a lone surrogate is a 400 naming its field), JSON errors,
the early token-id count, and the parser process that takes the large bodies."""

from __future__ import annotations

import asyncio
import json
import pickle
from typing import Any

import pytest

from moe_serve.server.errors import APIError, ErrorType
from moe_serve.server.protocol import ChatCompletionRequest, CompletionRequest
from moe_serve.server.request_body import (
    INLINE_BODY_BYTES,
    BodyParser,
    TokenIdPromptCheck,
    lone_surrogate_path,
    parse_body,
)
from moe_serve.server.token_bound import PromptLimit


def _error(raw: bytes, model: type = ChatCompletionRequest, precheck: Any = None) -> APIError:
    with pytest.raises(APIError) as info:
        parse_body(raw, model, precheck)
    return info.value


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (r'{"model": "m", "messages": [{"role": "user", "content": "a\ud800b"}]}', "messages[0].content"),
        (r'{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "x\udfff"}]}]}',
         "messages[0].content[0].text"),
        (r'{"model": "m\uDBFF", "messages": [{"role": "user", "content": "ok"}]}', "model"),
        (r'{"model": "m", "messages": [{"role": "user", "content": "ok"}], "stop": ["a", "\udc00"]}', "stop[1]"),
        (r'{"model": "m", "messages": [{"role": "user", "content": "ok", "name": "\ud800"}]}', "messages[0].name"),
        (r'{"model": "m", "messages": [{"role": "user", "content": "ok"}], "metadata": {"task": "\ud800"}}',
         "metadata.task"),
    ],
)
def test_a_lone_surrogate_in_any_string_is_a_400_naming_the_field(raw: str, param: str) -> None:
    error = _error(raw.encode())
    assert (error.status_code, error.code, error.param) == (400, "invalid_value", param)
    assert param in error.message
    json.dumps(error.body(), ensure_ascii=False).encode("utf-8")  # the answer itself encodes


def test_a_lone_surrogate_in_a_key_names_the_object_holding_it() -> None:
    error = _error(rb'{"model": "m", "messages": [], "metadata": {"\ud800": "x"}}')
    assert (error.code, error.param) == ("invalid_value", "metadata")
    top = _error(rb'{"\ud800": 1}')
    assert (top.code, top.param) == ("invalid_value", None)


def test_surrogate_pairs_and_raw_unicode_are_text() -> None:
    raw = r'{"model": "m", "messages": [{"role": "user", "content": "\ud83d\ude00 é 😀 \\ud800"}]}'.encode()
    body = parse_body(raw, ChatCompletionRequest)
    assert body.messages[0].content == "😀 é 😀 \\ud800"  # an escaped backslash is no escape
    assert lone_surrogate_path({"a": ["ok", {"b": "x\ud800"}]}) == (["a", 1, "b"], False)
    assert lone_surrogate_path({"a": ["ok", 3, None]}) is None


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"\xff\xfe{}", "invalid_json"),  # not UTF-8 (was a 400 with a null code)
        (b'{"model": "\xed\xa0\x80"}', "invalid_json"),  # a surrogate encoded as raw bytes is not UTF-8
        (b'{"model": ', "invalid_json"),
        (b"[" * 100_000, "invalid_json"),  # deeper than the JSON parser's recursion limit
        (b"", "missing_required_parameter"),
    ],
)
def test_bodies_that_are_not_json_text(raw: bytes, code: str) -> None:
    error = _error(raw)
    assert (error.status_code, error.code, error.param) == (400, code, None)


def test_token_id_prompts_longer_than_the_context_are_refused_by_their_count() -> None:
    check = TokenIdPromptCheck(PromptLimit(max_model_len=64, requested=None, param="prompt"))
    error = _error(json.dumps({"model": "m", "prompt": list(range(64))}).encode(), CompletionRequest, check)
    assert (error.code, error.param) == ("context_length_exceeded", "prompt")
    assert "64 tokens (64 in the prompt)" in error.message and "at least" not in error.message
    batch = _error(json.dumps({"model": "m", "prompt": [[1], list(range(70))]}).encode(), CompletionRequest, check)
    assert batch.code == "context_length_exceeded" and "70 in the prompt" in batch.message
    fits = parse_body(json.dumps({"model": "m", "prompt": list(range(63))}).encode(), CompletionRequest, check)
    assert fits.prompts() == [list(range(63))]
    text = parse_body(json.dumps({"model": "m", "prompt": "x" * 500}).encode(), CompletionRequest, check)
    assert text.prompts() == ["x" * 500]  # text is measured by the tokenizer pool, not here


def test_api_errors_cross_a_process_boundary_whole() -> None:
    error = APIError(429, "slow down", ErrorType.RATE_LIMIT, "rate_limit_exceeded", param="p",
                     headers={"Retry-After": "3"})
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.status_code, copy.body(), copy.headers) == (429, error.body(), error.headers)


class _Request:
    """The part of a Starlette request the parser reads."""

    def __init__(self, raw: bytes) -> None:
        self._raw = raw

    async def body(self) -> bytes:
        return self._raw


def test_large_bodies_are_parsed_in_the_parser_process_with_the_same_answers() -> None:
    parser = BodyParser()
    content = "lorem ipsum " * (2 * INLINE_BODY_BYTES // 12)
    large = json.dumps({"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": 3}).encode()
    bad = json.dumps({"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": "3"}).encode()
    check = TokenIdPromptCheck(PromptLimit(max_model_len=64, requested=None, param="prompt"))
    too_long = json.dumps({"model": "m", "prompt": list(range(100_000))}).encode()

    async def run() -> tuple[Any, APIError, APIError]:
        body = await parser.parse(_Request(large), ChatCompletionRequest)  # type: ignore[arg-type]
        errors = []
        for raw, model, precheck in ((bad, ChatCompletionRequest, None), (too_long, CompletionRequest, check)):
            with pytest.raises(APIError) as info:
                await parser.parse(_Request(raw), model, precheck)  # type: ignore[arg-type]
            errors.append(info.value)
        return body, errors[0], errors[1]

    try:
        body, bad_error, long_error = asyncio.run(run())
    finally:
        parser.shutdown()
    assert parser._executor is not None  # the large bodies did go to the parser process
    assert body.messages[0].content == content and body.max_tokens == 3
    assert (bad_error.status_code, bad_error.param) == (400, "max_tokens")
    assert bad_error.body() == _error(bad).body()  # the same answer as inline
    assert (long_error.code, long_error.param) == ("context_length_exceeded", "prompt")
