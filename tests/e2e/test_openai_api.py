"""The OpenAI-compatible API of a live server, driven by the official `openai` SDK (sync and
async) and by raw HTTP for what the SDK hides (SSE framing, error bodies, headers)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.conftest import REPO_ROOT, LiveServer

pytestmark = pytest.mark.e2e

GREEDY: dict[str, Any] = {"temperature": 0, "extra_body": {"ignore_eos": True}}
IDLE_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def client(live_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server.v1, api_key=live_server.api_key, max_retries=0)


def _aclient(server: LiveServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.v1, api_key=server.api_key, max_retries=0, timeout=60)


def _chat(client: openai.OpenAI, server: LiveServer, content: str, **kwargs: Any) -> Any:
    return client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": content}],
                                          **kwargs)


def _stream_text(client: openai.OpenAI, server: LiveServer, content: str, **kwargs: Any) -> tuple[str, list[Any]]:
    chunks = list(_chat(client, server, content, stream=True, **kwargs))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


def _health(server: LiveServer) -> dict[str, Any]:
    response = httpx.get(f"{server.base_url}/health", timeout=5)
    assert response.status_code == 200
    return response.json()


def _wait_idle(server: LiveServer, timeout_s: float = IDLE_TIMEOUT_S) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        body = _health(server)
        if body["num_running"] == 0 and body["num_waiting"] == 0 and body["kv_cache_usage"] == 0:
            return body
        assert time.monotonic() < deadline, f"engine not idle {timeout_s} s after the clients left: {body}"
        time.sleep(0.05)


def test_plain_chat_has_the_openai_shape(client: openai.OpenAI, live_server: LiveServer) -> None:
    response = _chat(client, live_server, "Hello!", max_tokens=8, **GREEDY)
    assert response.id.startswith("chatcmpl-") and response.object == "chat.completion"
    assert response.model == live_server.model
    choice = response.choices[0]
    assert (choice.index, choice.message.role, choice.finish_reason, choice.logprobs) == (0, "assistant", "length", None)
    usage = response.usage
    assert usage.completion_tokens == 8 and usage.total_tokens == usage.prompt_tokens + 8 and usage.prompt_tokens > 0


def test_streaming_chat_sends_role_deltas_finish_usage_then_done(client: openai.OpenAI, live_server: LiveServer) -> None:
    whole = _chat(client, live_server, "Tell me a story.", max_tokens=12, **GREEDY)
    text, chunks = _stream_text(client, live_server, "Tell me a story.", max_tokens=12,
                                stream_options={"include_usage": True}, **GREEDY)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    raw = httpx.post(f"{live_server.v1}/chat/completions", headers=live_server.auth(), timeout=30, json={
        "model": live_server.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.rstrip().endswith("data: [DONE]")


def test_n_choices_use_seed_plus_index_and_seeds_reproduce(client: openai.OpenAI, live_server: LiveServer) -> None:
    sampled: dict[str, Any] = {"temperature": 1.0, "max_tokens": 10, "extra_body": {"ignore_eos": True}}
    both = _chat(client, live_server, "Pick a word.", n=2, seed=7, **sampled)
    assert [c.index for c in both.choices] == [0, 1] and both.usage.completion_tokens == 20
    texts = [c.message.content for c in both.choices]
    alone = [_chat(client, live_server, "Pick a word.", seed=s, **sampled).choices[0].message.content for s in (7, 8)]
    assert texts == alone
    streamed, _ = _stream_text(client, live_server, "Pick a word.", seed=7, **sampled)
    assert streamed == texts[0]


def test_stop_sequence_cuts_the_text_and_reports_stop(client: openai.OpenAI, live_server: LiveServer) -> None:
    full = _chat(client, live_server, "Count slowly.", max_tokens=40, **GREEDY).choices[0].message.content
    start = next(i for i in range(3, len(full) - 2) if full[i:i + 2].isascii() and full[i:i + 2].isprintable())
    stop = full[start:start + 2]
    cut = _chat(client, live_server, "Count slowly.", max_tokens=40, stop=[stop], **GREEDY).choices[0]
    assert cut.finish_reason == "stop" and cut.message.content == full[:full.find(stop)]
    streamed, _ = _stream_text(client, live_server, "Count slowly.", max_tokens=40, stop=stop, **GREEDY)
    assert streamed == cut.message.content


def test_logprobs_are_greedy_consistent_in_both_modes(client: openai.OpenAI, live_server: LiveServer) -> None:
    response = _chat(client, live_server, "Hi", max_tokens=6, logprobs=True, top_logprobs=3, **GREEDY)
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens == 6
    for entry in content:
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and entry.logprob == pytest.approx(tops[0])
        assert entry.bytes == list(entry.token.encode("utf-8"))
    _, chunks = _stream_text(client, live_server, "Hi", max_tokens=6, logprobs=True, top_logprobs=3, **GREEDY)
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in content]


def _engine_greedy_text(server: LiveServer, prompt: str, max_tokens: int, chat: bool) -> str:
    command = [sys.executable, "-m", "moe_serve.server.cli", "generate", "--model", str(server.checkpoint), "--prompt", prompt,
               "--max-tokens", str(max_tokens), "--ignore-eos", "--json", "--dtype", "float32", "--device", "cpu",
               "--max-model-len", str(server.max_model_len)] + (["--chat"] if chat else [])
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=180, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["text"]


def test_temperature_zero_equals_the_engine_greedy_tokens(client: openai.OpenAI, live_server: LiveServer) -> None:
    chat = _chat(client, live_server, "What is MoE?", max_tokens=12, **GREEDY).choices[0].message.content
    assert chat == _engine_greedy_text(live_server, "What is MoE?", 12, chat=True)
    text = client.completions.create(model=live_server.model, prompt="The quick brown", max_tokens=12, **GREEDY)
    assert text.choices[0].text == _engine_greedy_text(live_server, "The quick brown", 12, chat=False)


def test_completions_accept_text_and_token_ids_and_stream(client: openai.OpenAI, live_server: LiveServer) -> None:
    text = client.completions.create(model=live_server.model, prompt="Once upon", max_tokens=5, **GREEDY)
    assert text.object == "text_completion" and text.id.startswith("cmpl-") and text.choices[0].finish_reason == "length"
    ids = client.completions.create(model=live_server.model, prompt=[5, 60, 61, 62], max_tokens=5, logprobs=2, **GREEDY)
    assert ids.usage.prompt_tokens == 4 and len(ids.choices[0].logprobs.token_logprobs) == 5
    chunks = list(client.completions.create(model=live_server.model, prompt="Once upon", max_tokens=5, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text.choices[0].text
    assert chunks[-1].usage.completion_tokens == 5


def test_models_and_unknown_model(client: openai.OpenAI, live_server: LiveServer) -> None:
    assert [m.id for m in client.models.list().data] == [live_server.model]
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert info.value.body["code"] == "model_not_found"


def test_api_key_missing_wrong_and_right(live_server: LiveServer) -> None:
    missing = httpx.get(f"{live_server.v1}/models", timeout=5)
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    wrong = openai.OpenAI(base_url=live_server.v1, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    right = openai.OpenAI(base_url=live_server.v1, api_key=live_server.api_key, max_retries=0)
    assert right.models.list().data[0].id == live_server.model
    assert httpx.get(f"{live_server.base_url}/health", timeout=5).status_code == 200
    assert httpx.get(f"{live_server.base_url}/metrics", timeout=5).status_code == 200


def test_request_id_is_echoed_or_generated(live_server: LiveServer) -> None:
    echoed = httpx.get(f"{live_server.v1}/models", headers={**live_server.auth(), "X-Request-Id": "req-42"}, timeout=5)
    assert echoed.headers["x-request-id"] == "req-42"
    assert httpx.get(f"{live_server.v1}/models", headers=live_server.auth(), timeout=5).headers["x-request-id"]


async def _stream_chat(aclient: openai.AsyncOpenAI, server: LiveServer, content: str, max_tokens: int) -> str:
    stream = await aclient.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": content}], stream=True, max_tokens=max_tokens,
        **GREEDY)
    return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])


def test_32_concurrent_streams_each_get_their_solo_text(live_server: LiveServer) -> None:
    prompts = [f"Request number {i}: say something." for i in range(32)]

    async def run() -> tuple[list[str], list[str]]:
        aclient = _aclient(live_server)
        solo = [await _stream_chat(aclient, live_server, p, 16) for p in prompts]
        together = await asyncio.gather(*(_stream_chat(aclient, live_server, p, 16) for p in prompts))
        await aclient.close()
        return solo, list(together)

    solo, together = asyncio.run(run())
    assert together == solo


def test_50_streams_cancelled_midway_free_the_engine(live_server: LiveServer, client: openai.OpenAI) -> None:
    # 50 x 4 choices x 230 tokens take several times the 2 s idle bound if nothing is aborted
    async def start_and_cancel(aclient: openai.AsyncOpenAI, i: int) -> int:
        stream = await aclient.chat.completions.create(
            model=live_server.model, messages=[{"role": "user", "content": f"long story {i}"}], stream=True,
            max_tokens=230, n=4, **GREEDY)
        received = 0
        async for _chunk in stream:
            received += 1
            if received == 3:
                break
        await stream.close()
        return received

    async def run() -> list[int]:
        aclient = _aclient(live_server)
        received = await asyncio.gather(*(start_and_cancel(aclient, i) for i in range(50)))
        await aclient.close()
        return list(received)

    assert asyncio.run(run()) == [3] * 50
    _wait_idle(live_server)
    assert _chat(client, live_server, "still there?", max_tokens=4, **GREEDY).usage.completion_tokens == 4


def test_non_streaming_client_disconnect_aborts_the_request(live_server: LiveServer) -> None:
    body = {"model": live_server.model, "messages": [{"role": "user", "content": "go"}], "n": 16,
            "max_tokens": 230, "ignore_eos": True, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{live_server.v1}/chat/completions", json=body, headers=live_server.auth(), timeout=0.15)
    _wait_idle(live_server)


LONG_PROMPT = "word " * 400
MESSAGES = [{"role": "user", "content": "hi"}]
BAD_INPUTS: list[tuple[str, Any, int, str | None]] = [
    ("malformed json", b'{"model": ', 400, "invalid_json"),
    ("missing messages", {"model": "M"}, 400, "missing_required_parameter"),
    ("empty messages", {"model": "M", "messages": []}, 400, "invalid_value"),
    ("unknown role", {"model": "M", "messages": [{"role": "wizard", "content": "x"}]}, 400, "invalid_value"),
    ("non-string content", {"model": "M", "messages": [{"role": "user", "content": 42}]}, 400, "invalid_value"),
    ("max_tokens -1", {"model": "M", "messages": MESSAGES, "max_tokens": -1}, 400, "invalid_value"),
    ("temperature 5", {"model": "M", "messages": MESSAGES, "temperature": 5}, 400, "invalid_value"),
    ("n 0", {"model": "M", "messages": MESSAGES, "n": 0}, 400, "invalid_value"),
    ("unknown model", {"model": "gpt-9", "messages": MESSAGES}, 404, "model_not_found"),
    ("unsupported parameter", {"model": "M", "messages": MESSAGES, "functions": [{"name": "f"}]}, 400,
     "unsupported_parameter"),
    ("unknown field", {"model": "M", "messages": MESSAGES, "bogus": 1}, 400, "unknown_parameter"),
    ("prompt beyond context", {"model": "M", "messages": [{"role": "user", "content": LONG_PROMPT}]}, 400,
     "context_length_exceeded"),
    ("10 MB body", b"{" + b" " * (10 * 2**20) + b"}", 413, "request_too_large"),
]


@pytest.mark.parametrize(("case", "body", "status", "code"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_gets_an_openai_error_and_the_server_stays_healthy(
    live_server: LiveServer, case: str, body: Any, status: int, code: str | None
) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).replace('"M"', json.dumps(live_server.model))
    response = httpx.post(f"{live_server.v1}/chat/completions", content=content, timeout=30,
                          headers={**live_server.auth(), "Content-Type": "application/json"})
    assert response.status_code == status, (case, response.text)
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    assert _health(live_server)["status"] == "ok"


def test_a_field_the_engine_rejects_and_the_context_length_get_a_400_naming_the_field(live_server: LiveServer) -> None:
    """One validation boundary: the engine's add-time check answers before any response byte
    (streaming too), with `param` carried by the exception; one context-length rule."""
    def post(route: str, body: dict[str, Any]) -> dict[str, Any]:
        response = httpx.post(f"{live_server.v1}/{route}", json={"model": live_server.model, **body},
                              headers=live_server.auth(), timeout=30)
        assert response.status_code == 400, response.text
        return response.json()["error"]

    for stream in (False, True):
        error = post("chat/completions", {"messages": MESSAGES, "max_tokens": 4, "min_tokens": 5, "n": 2,
                                          "stream": stream})
        assert (error["code"], error["param"], error["message"]) == (
            "invalid_value", "min_tokens", "min_tokens must be in [0, max_tokens], got 5")
    error = post("completions", {"prompt": "hi", "min_tokens": 17})
    assert (error["code"], error["param"]) == ("invalid_value", "min_tokens")
    n = live_server.max_model_len
    error = post("completions", {"prompt": [1, 2], "max_tokens": n - 1})
    assert (error["code"], error["param"], error["message"]) == (
        "context_length_exceeded", "prompt", f"This model's maximum context length is {n} tokens. However, you "
        f"requested {n + 1} tokens (2 in the prompt and {n - 1} in the completion). Please reduce the length of the "
        "prompt or the completion.")
    error = post("completions", {"prompt": [1] * n})
    assert (error["code"], error["param"]) == ("context_length_exceeded", "prompt")
    assert f"you requested {n} tokens ({n} in the prompt)" in error["message"]
    error = post("chat/completions", {"messages": MESSAGES, "max_completion_tokens": n})
    assert (error["code"], error["param"]) == ("context_length_exceeded", "messages")
    assert _health(live_server)["status"] == "ok"
