"""The traffic of benchmarks/soak.py: the deck of request scenarios, the clients that send them,
and the checks that decide whether each answer is what the API documents.

Scenarios: chat and completions, JSON and streamed, n up to 2, all seeded (a request repeated
later must return the same text); a stream the client closes mid-way (cancel); a client
process killed mid-stream and replaced by a new one repeating the request, whose text must
extend what the killed one received (client restart); bad inputs (malformed JSON, an unknown
field, a prompt longer than the context, a value of the wrong type), each of which must get
a 400 with an OpenAI error body. Every answer must carry X-Request-Id.

A request is lost when it gets no response, an unexpected status, a malformed body or
stream, or seeded text that differs from an earlier identical request; it is hung when it
hits the client-side timeout.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from benchmarks.soak_client import API_KEY_ENV, STATUS_PREFIX

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ("Hello", "Tell me a story about a ship.", "def fib(n):", "The capital of France is")
SEEDS = (1, 2)
CUT_AFTER_CHUNKS = 2  # content chunks a cancelled or killed stream reads first
CUT_MAX_TOKENS = 64
LONG_PROMPT_TOKEN_ID = 17


class Scenario(str, enum.Enum):
    """What one request of the deck does."""

    CHAT = "chat"
    COMPLETION = "completion"
    CHAT_STREAM = "chat_stream"
    COMPLETION_STREAM = "completion_stream"
    CANCEL = "cancel"
    CLIENT_RESTART = "client_restart"
    BAD_JSON = "bad_json"
    UNKNOWN_FIELD = "unknown_field"
    TOO_LONG = "too_long"
    BAD_TYPE = "bad_type"


DECK_WEIGHTS: dict[Scenario, int] = {
    Scenario.CHAT: 3, Scenario.COMPLETION: 2, Scenario.CHAT_STREAM: 2, Scenario.COMPLETION_STREAM: 1,
    Scenario.CANCEL: 1, Scenario.CLIENT_RESTART: 1, Scenario.BAD_JSON: 1, Scenario.UNKNOWN_FIELD: 1,
    Scenario.TOO_LONG: 1, Scenario.BAD_TYPE: 1,
}
BAD_INPUTS = frozenset({Scenario.BAD_JSON, Scenario.UNKNOWN_FIELD, Scenario.TOO_LONG, Scenario.BAD_TYPE})


class Outcome(str, enum.Enum):
    """How one request ended, from the client's side."""

    OK = "ok"  # a normal request answered in full and checked
    REJECTED = "rejected"  # a bad input answered with its 400
    CANCELLED = "cancelled"  # a stream the client cut on purpose, well-formed up to the cut
    LOST = "lost"
    HUNG = "hung"


class LostKind(str, enum.Enum):
    """Why a request counts as lost."""

    TRANSPORT = "transport"  # no response (connection refused, reset, closed early)
    STATUS = "status"  # an unexpected HTTP status
    SHAPE = "shape"  # a body or stream that is not what the API documents
    MISMATCH = "mismatch"  # seeded text differs from an earlier identical request


class Lost(Exception):
    """The response is not what the request should get."""

    def __init__(self, kind: LostKind, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


@dataclass(frozen=True)
class Record:
    """One finished request."""

    scenario: Scenario
    outcome: Outcome
    finished_s: float  # since the soak started
    latency_s: float | None = None  # successful JSON requests
    ttft_s: float | None = None  # successful streams: first content chunk
    kind: str | None = None  # the 4xx code of a rejection, or the LostKind


@dataclass(frozen=True)
class Plan:
    """One request to send: where, what, and what a correct answer looks like."""

    scenario: Scenario
    path: str
    body: bytes
    n: int = 1
    max_tokens: int = 0
    chat: bool = True

    @property
    def key(self) -> tuple[str, bytes]:
        return self.path, self.body


@dataclass
class StreamState:
    """What an SSE stream carried so far; `feed` raises Lost on anything malformed."""

    chat: bool
    texts: dict[int, str] = field(default_factory=dict)
    finished: set[int] = field(default_factory=set)
    content_chunks: int = 0
    first_content_s: float | None = None
    completion_tokens: int | None = None
    done: bool = False

    def feed(self, line: str) -> None:
        if not line.startswith("data: "):
            if line.strip():
                raise Lost(LostKind.SHAPE, f"unexpected stream line {line[:80]!r}")
            return
        data = line[len("data: "):]
        if self.done:
            raise Lost(LostKind.SHAPE, "data after [DONE]")
        if data == "[DONE]":
            self.done = True
            return
        try:
            chunk = json.loads(data)
            if "error" in chunk:
                raise Lost(LostKind.SHAPE, f"error event: {chunk['error'].get('message')}")
            if chunk.get("usage"):
                self.completion_tokens = int(chunk["usage"]["completion_tokens"])
            for choice in chunk["choices"]:
                index = int(choice["index"])
                text = choice["delta"].get("content") if self.chat else choice["text"]
                if text:
                    self.texts[index] = self.texts.get(index, "") + text
                    self.content_chunks += 1
                    if self.first_content_s is None:
                        self.first_content_s = time.monotonic()
                if choice.get("finish_reason") is not None:
                    self.finished.add(index)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise Lost(LostKind.SHAPE, f"malformed chunk ({exc!r}): {data[:120]}") from exc

    def check_complete(self, plan: Plan) -> tuple[str, ...]:
        """The text of each choice, once the stream ended as documented."""
        if not self.done:
            raise Lost(LostKind.SHAPE, "the stream ended without [DONE]")
        if self.finished != set(range(plan.n)):
            raise Lost(LostKind.SHAPE, f"finish_reason for choices {sorted(self.finished)}, expected {plan.n}")
        if self.completion_tokens != plan.n * plan.max_tokens:
            raise Lost(LostKind.SHAPE, f"usage.completion_tokens {self.completion_tokens}, "
                                       f"expected {plan.n * plan.max_tokens}")
        return tuple(self.texts.get(i, "") for i in range(plan.n))


@dataclass
class Traffic:
    """What the clients of one run share: the server, the deck, the seeded answers seen, the records."""

    base_url: str
    model: str
    api_key: str | None
    duration_s: float
    timeout_s: float
    seed: int
    long_prompt_tokens: int
    deck: list[Scenario] = field(init=False)
    long_prompt: bytes = field(init=False)
    records: list[Record] = field(default_factory=list)
    seeded_texts: dict[tuple[str, bytes], tuple[str, ...]] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    next_index: int = 0

    def __post_init__(self) -> None:
        self.deck = build_deck(self.seed)
        self.long_prompt = dumps({"model": self.model, "prompt": [LONG_PROMPT_TOKEN_ID] * self.long_prompt_tokens})

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def next_plan(self) -> Plan:
        """The deck's next scenario with parameters drawn from its position (not from timing)."""
        index = self.next_index
        self.next_index += 1
        rng = random.Random(self.seed * 1_000_003 + index)
        return plan_request(self.deck[index % len(self.deck)], rng, self.model, self.long_prompt)

    def check_seeded(self, plan: Plan, texts: tuple[str, ...]) -> None:
        expected = self.seeded_texts.setdefault(plan.key, texts)
        if texts != expected:
            raise Lost(LostKind.MISMATCH, f"{plan.scenario.value}: seeded text {texts!r} differs from {expected!r}")


def build_deck(seed: int) -> list[Scenario]:
    deck = [scenario for scenario, weight in DECK_WEIGHTS.items() for _ in range(weight)]
    random.Random(seed).shuffle(deck)
    return deck


def dumps(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()


def plan_request(scenario: Scenario, rng: random.Random, model: str, long_prompt: bytes) -> Plan:
    """The request of `scenario`, its parameters drawn from `rng`."""
    chat = scenario in (Scenario.CHAT, Scenario.CHAT_STREAM, Scenario.CANCEL, Scenario.CLIENT_RESTART)
    path = "/v1/chat/completions" if chat else "/v1/completions"
    prompt = rng.choice(PROMPTS)
    body: dict[str, Any] = {"model": model, "seed": rng.choice(SEEDS), "temperature": 0.9, "ignore_eos": True,
                            "n": rng.choice((1, 2)), "max_tokens": rng.choice((8, 16))}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt if rng.random() < 0.5 else [rng.randrange(10, 200) for _ in range(8)]
    if scenario in (Scenario.CANCEL, Scenario.CLIENT_RESTART):
        body.update(n=1, max_tokens=CUT_MAX_TOKENS)
    if scenario in (Scenario.CHAT_STREAM, Scenario.COMPLETION_STREAM, Scenario.CANCEL, Scenario.CLIENT_RESTART):
        body.update(stream=True, stream_options={"include_usage": True})
    if scenario == Scenario.BAD_JSON:
        raw = rng.choice((b'{"model": ', b'{"model": "m", "messages": [}', b"not json at all"))
        return Plan(scenario, path, raw)
    if scenario == Scenario.UNKNOWN_FIELD:
        body[rng.choice(("frobnicate", "temprature", "max_token"))] = 1
    elif scenario == Scenario.BAD_TYPE:
        field_name, value = rng.choice((("temperature", "hot"), ("messages", "hi"), ("n", "two"),
                                        ("max_tokens", [16])))
        body[field_name] = value
    elif scenario == Scenario.TOO_LONG:
        return Plan(scenario, "/v1/completions", long_prompt)
    return Plan(scenario, path, dumps(body), body["n"], body["max_tokens"], chat)


def error_code(response: httpx.Response) -> str:
    """The code of an OpenAI error body; Lost when the body is not one or its code is not a string."""
    try:
        error = response.json()["error"]
        if not isinstance(error["message"], str) or not isinstance(error["code"], str) or not error["code"]:
            raise TypeError("error.message and error.code must be strings")
    except (ValueError, KeyError, TypeError) as exc:
        raise Lost(LostKind.SHAPE, f"{response.status_code} without an OpenAI error body with a string code: "
                                   f"{response.text[:120]}") from exc
    return str(error["code"])


def check_headers(response: httpx.Response) -> None:
    if not response.headers.get("x-request-id"):
        raise Lost(LostKind.SHAPE, f"{response.status_code} response without X-Request-Id")


def check_status(response: httpx.Response, expected: int) -> None:
    check_headers(response)
    if response.status_code != expected:
        raise Lost(LostKind.STATUS, f"got {response.status_code}, expected {expected}: {response.text[:200]}")


def json_texts(plan: Plan, response: httpx.Response) -> tuple[str, ...]:
    """The text of each choice of a JSON completion, once its shape is checked."""
    try:
        reply = response.json()
        if reply["object"] != ("chat.completion" if plan.chat else "text_completion"):
            raise ValueError(f"object {reply['object']!r}")
        choices = sorted(reply["choices"], key=lambda c: c["index"])
        if [c["index"] for c in choices] != list(range(plan.n)):
            raise ValueError(f"choice indices {[c['index'] for c in choices]}")
        if reply["usage"]["completion_tokens"] != plan.n * plan.max_tokens:
            raise ValueError(f"usage.completion_tokens {reply['usage']['completion_tokens']}")
        if any(c["finish_reason"] != "length" for c in choices):
            raise ValueError("finish_reason is not 'length' with ignore_eos")
        texts = tuple(c["message"]["content"] if plan.chat else c["text"] for c in choices)
    except (ValueError, KeyError, TypeError) as exc:
        raise Lost(LostKind.SHAPE, f"{plan.scenario.value}: {exc}") from exc
    if not all(isinstance(t, str) for t in texts):
        raise Lost(LostKind.SHAPE, f"{plan.scenario.value}: a choice without text")
    return texts


async def read_stream(traffic: Traffic, client: httpx.AsyncClient, plan: Plan, stop_after_chunks: int | None = None
                      ) -> StreamState:
    """Stream `plan` until [DONE], or until `stop_after_chunks` content chunks when given (then close)."""
    state = StreamState(plan.chat)
    async with client.stream("POST", plan.path, content=plan.body, headers=traffic.headers()) as response:
        if response.status_code != 200:
            await response.aread()
        check_status(response, 200)
        async for line in response.aiter_lines():
            state.feed(line)
            if stop_after_chunks is not None and state.content_chunks >= stop_after_chunks:
                break
    return state


async def kill_client_mid_stream(traffic: Traffic, plan: Plan) -> str:
    """Start a client process on `plan`, SIGKILL it after a few content chunks; the text it had."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.soak_client", traffic.base_url + plan.path, cwd=ROOT,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, API_KEY_ENV: traffic.api_key or ""})
    state = StreamState(plan.chat)
    try:
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(plan.body)
        process.stdin.close()
        status = (await process.stdout.readline()).decode().strip()
        if status != f"{STATUS_PREFIX}200":
            body = (await process.stdout.read()).decode(errors="replace")
            raise Lost(LostKind.STATUS if status else LostKind.TRANSPORT,
                       f"the client process got {status or 'no response'!r}, expected 200: {body[:200]}")
        while state.content_chunks < CUT_AFTER_CHUNKS and not state.done:
            line = await process.stdout.readline()
            if not line:
                raise Lost(LostKind.TRANSPORT, "the client process's stream ended before it was killed")
            state.feed(line.decode().rstrip("\r\n"))
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
    return state.texts.get(0, "")


async def run_plan(traffic: Traffic, client: httpx.AsyncClient, plan: Plan) -> Record:
    """Send `plan` and check the answer; raises Lost when it is wrong."""
    start = time.monotonic()
    if plan.scenario in BAD_INPUTS:
        response = await client.post(plan.path, content=plan.body, headers=traffic.headers())
        check_status(response, 400)
        return Record(plan.scenario, Outcome.REJECTED, traffic.elapsed(), kind=error_code(response))
    if plan.scenario == Scenario.CANCEL:
        state = await read_stream(traffic, client, plan, stop_after_chunks=CUT_AFTER_CHUNKS)
        if state.content_chunks < CUT_AFTER_CHUNKS:
            state.check_complete(plan)
        return Record(plan.scenario, Outcome.CANCELLED, traffic.elapsed())
    if plan.scenario in (Scenario.CHAT, Scenario.COMPLETION):
        response = await client.post(plan.path, content=plan.body, headers=traffic.headers())
        check_status(response, 200)
        traffic.check_seeded(plan, json_texts(plan, response))
        return Record(plan.scenario, Outcome.OK, traffic.elapsed(), latency_s=time.monotonic() - start)
    partial = await kill_client_mid_stream(traffic, plan) if plan.scenario == Scenario.CLIENT_RESTART else ""
    start = time.monotonic()
    state = await read_stream(traffic, client, plan)
    texts = state.check_complete(plan)
    if not texts[0].startswith(partial):
        raise Lost(LostKind.MISMATCH, f"the new client's text {texts[0]!r} does not extend the killed one's "
                                      f"{partial!r}")
    traffic.check_seeded(plan, texts)
    ttft = state.first_content_s - start if state.first_content_s is not None else None
    return Record(plan.scenario, Outcome.OK, traffic.elapsed(), ttft_s=ttft)


async def send(traffic: Traffic, client: httpx.AsyncClient, plan: Plan) -> Record:
    """One request under the client-side timeout, classified."""
    try:
        return await asyncio.wait_for(run_plan(traffic, client, plan), traffic.timeout_s)
    except (asyncio.TimeoutError, httpx.TimeoutException):
        logger.warning("hung: %s after %.0f s", plan.scenario.value, traffic.timeout_s)
        return Record(plan.scenario, Outcome.HUNG, traffic.elapsed(), kind="timeout")
    except httpx.TransportError as exc:
        lost = Lost(LostKind.TRANSPORT, f"{type(exc).__name__}: {exc}")
    except (httpx.HTTPError, UnicodeDecodeError) as exc:
        lost = Lost(LostKind.SHAPE, f"{type(exc).__name__}: {exc}")
    except Lost as exc:
        lost = exc
    logger.warning("lost: %s: %s: %s", plan.scenario.value, lost.kind.value, lost)
    return Record(plan.scenario, Outcome.LOST, traffic.elapsed(), kind=lost.kind.value)


async def client_loop(traffic: Traffic) -> None:
    """One client: its own connection pool, requests back to back until the run's duration is over."""
    async with httpx.AsyncClient(base_url=traffic.base_url, timeout=traffic.timeout_s) as client:
        while traffic.elapsed() < traffic.duration_s:
            traffic.records.append(await send(traffic, client, traffic.next_plan()))
