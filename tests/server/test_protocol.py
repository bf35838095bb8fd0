"""Request models, error mapping and middleware of the HTTP front end (no model needed),
plus a property test: no request body, however malformed, gets anything but 400."""

from __future__ import annotations

import json
import pickle
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from moe_serve.engine.core.guided.spec import GuidedDecoding
from moe_serve.engine.errors import (
    ContextLengthExceeded,
    ContextLengthExceededError,
    EngineDeadError,
    InvalidParameter,
    InvalidRequestError,
    ModelLoadError,
    QueueFullError,
)
from moe_serve.server.auth import key_matches
from moe_serve.server.errors import APIError, from_engine_error, from_validation_errors, param_from_loc
from moe_serve.server.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest
from moe_serve.server.responses_api import ResponseStore, StoredResponse
from moe_serve.server.responses_protocol import ResponsesRequest, input_messages
from moe_serve.server.sampling import response_format_guided

MESSAGES = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def _error(cls: type, body: Any) -> APIError | None:
    try:
        cls.model_validate(body)
    except ValidationError as exc:
        return from_validation_errors(exc.errors())
    return None


def _assert_openai_shape(body: dict[str, Any]) -> None:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert isinstance(body["error"]["code"], str) and body["error"]["code"]
    assert body["error"]["param"] is None or isinstance(body["error"]["param"], str)


def test_a_minimal_chat_request_gets_openai_defaults() -> None:
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": MESSAGES})
    assert req.n == 1 and req.stream is False and req.num_logprobs() is None
    assert req.output_limit() is None and req.stop_list() == [] and req.task is None


def test_content_parts_are_joined_and_developer_renders_as_system() -> None:
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": [
        {"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ]})
    assert req.messages[0].template_dict() == {"role": "system", "content": "a\nb"}


def test_max_completion_tokens_wins_and_logprobs_map_to_a_top_count() -> None:
    req = ChatCompletionRequest.model_validate({
        "model": "m", "messages": MESSAGES, "max_tokens": 5, "max_completion_tokens": 7,
        "logprobs": True, "top_logprobs": 3, "stop": "x", "metadata": {"task": "chat"},
    })
    assert req.output_limit() == 7 and req.num_logprobs() == 3 and req.stop_list() == ["x"] and req.task == "chat"
    assert ChatCompletionRequest.model_validate(
        {"model": "m", "messages": MESSAGES, "logprobs": True}).num_logprobs() == 0


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"model": "m"}, "messages", "missing_required_parameter"),
        ({"model": "m", "messages": []}, "messages", "invalid_value"),
        ({"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "invalid_value"),
        ({"model": "m", "messages": [{"role": "user", "content": None}]}, "messages[0]", "invalid_value"),
        ({"model": "m", "messages": [{"role": "user", "content": "x", "tool_call_id": "c"}]}, "messages[0]",
         "invalid_value"),
        ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages[0].content", "invalid_value"),
        ({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
         "messages[0].content", "unsupported_parameter"),
        ({"model": "m", "messages": MESSAGES, "max_tokens": -1}, "max_tokens", "invalid_value"),
        ({"model": "m", "messages": MESSAGES, "temperature": 5}, "temperature", "invalid_value"),
        ({"model": "m", "messages": MESSAGES, "n": 0}, "n", "invalid_value"),
        ({"model": "m", "messages": MESSAGES, "stop": ["ok", ""]}, "stop", "invalid_value"),
        ({"model": "m", "messages": MESSAGES, "tools": [{"type": "function"}]}, "tools[0].function",
         "missing_required_parameter"),
        ({"model": "m", "messages": MESSAGES, "tools": [{"type": "custom", "custom": {}}]}, "tools[0].type",
         "invalid_value"),
        ({"model": "m", "messages": MESSAGES, "tools": [TOOL, TOOL]}, "tools", "invalid_value"),
        ({"model": "m", "messages": MESSAGES, "tool_choice": "required"}, "tool_choice", "invalid_value"),
        ({"model": "m", "messages": MESSAGES, "tools": [TOOL], "tool_choice": {
            "type": "function", "function": {"name": "other"}}}, "tool_choice", "invalid_value"),
        ({"model": "m", "messages": MESSAGES, "functions": [TOOL["function"]]}, "functions", "unsupported_parameter"),
        ({"model": "m", "messages": MESSAGES, "logit_bias": {"1": 5}}, "logit_bias", "unsupported_parameter"),
        ({"model": "m", "messages": MESSAGES, "response_format": {"type": "xml"}}, "response_format.type",
         "invalid_value"),
        ({"model": "m", "messages": MESSAGES, "response_format": {"type": "json_schema"}}, "response_format",
         "invalid_value"),
        ({"model": "m", "messages": MESSAGES, "response_format": {"type": "json_schema", "json_schema": {
            "schema": {}}}}, "response_format.json_schema.name", "missing_required_parameter"),
        ({"model": "m", "messages": MESSAGES, "frobnicate": 1}, "frobnicate", "unknown_parameter"),
        ({"model": "m", "messages": MESSAGES, "stream_options": {"include_usage": True}}, "stream_options",
         "invalid_value"),
        ({"model": "m", "messages": MESSAGES, "top_logprobs": 2}, "top_logprobs", "invalid_value"),
        ({"model": "m", "messages": MESSAGES, "metadata": {"task": "no spaces"}}, "metadata", "invalid_value"),
    ],
)
def test_bad_chat_bodies_get_a_400_naming_the_field(body: dict[str, Any], param: str, code: str) -> None:
    error = _error(ChatCompletionRequest, body)
    assert error is not None and error.status_code == 400
    assert error.param == param and error.code == code
    _assert_openai_shape(error.body())


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_tokens", "10"), ("max_tokens", True), ("max_tokens", 10.0), ("n", "2"), ("seed", "7"), ("stream", "yes"),
     ("stream", 1), ("logprobs", "true"), ("top_logprobs", False), ("temperature", "0.5"), ("temperature", True),
     ("top_k", "5"), ("ignore_eos", "false"), ("priority", 1.5)],
)
def test_no_type_coercion_a_string_or_a_boolean_is_no_number(field: str, value: Any) -> None:
    body = {"model": "m", "messages": MESSAGES, "logprobs": True, field: value}
    error = _error(ChatCompletionRequest, body)
    assert error is not None and (error.status_code, error.param, error.code) == (400, field, "invalid_value")


def test_number_fields_take_integers_as_openai_does() -> None:
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": MESSAGES, "temperature": 1, "top_p": 1,
                                                "presence_penalty": -2, "repetition_penalty": 2})
    assert (req.temperature, req.top_p, req.presence_penalty, req.repetition_penalty) == (1.0, 1.0, -2.0, 2.0)
    assert isinstance(req.temperature, float)
    error = _error(ChatCompletionRequest, {"model": "m", "messages": MESSAGES, "stream_options": {"include_usage": 1},
                                           "stream": True})
    assert error is not None and error.param == "stream_options.include_usage"
    error = _error(CompletionRequest, {"model": "m", "prompt": "x", "logprobs": True})
    assert error is not None and error.param == "logprobs"


def test_messages_name_the_unsupported_kind() -> None:
    parts = _error(ChatCompletionRequest, {"model": "m", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]})
    assert parts is not None and parts.message == "content parts of type 'image_url' are not supported"


def test_tool_calls_and_results_reach_the_template_with_object_arguments() -> None:
    req = ChatCompletionRequest.model_validate({"model": "m", "tools": [TOOL], "tool_choice": {
        "type": "function", "function": {"name": "get_weather"}}, "parallel_tool_calls": False, "messages": [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": "not json"}}]},
        {"role": "tool", "content": "rain", "tool_call_id": "call_1"},
    ]})
    assert req.messages[1].template_dict() == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}},
        {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": "not json"}}]}
    assert req.messages[2].template_dict() == {"role": "tool", "content": "rain", "tool_call_id": "call_1"}
    sent_back = ChatMessage.model_validate({"role": "assistant", "content": None, "refusal": None, "annotations": None,
                                            "audio": None, "function_call": None, "tool_calls": [
                                                {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]})
    assert sent_back.template_dict()["tool_calls"][0]["function"] == {"name": "f", "arguments": {}}
    refused = ChatMessage.model_validate({"role": "assistant", "content": None, "refusal": "I cannot."})
    assert refused.template_dict() == {"role": "assistant", "content": "I cannot."}
    assert req.tools is not None and req.tools[0].function.parameters_schema() == {"type": "object"}
    assert req.parallel_tool_calls is False


@pytest.mark.parametrize(("response_format", "expected"), [
    (None, None),
    ({"type": "text"}, None),
    ({"type": "json_object"}, GuidedDecoding.json_object()),
    ({"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object"}, "strict": True}},
     GuidedDecoding.json_schema({"type": "object"}, strict=True, param="response_format.json_schema.schema")),
    ({"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "integer"}}},
     GuidedDecoding.json_schema({"type": "integer"}, strict=False, param="response_format.json_schema.schema")),
])
def test_response_format_maps_to_the_engines_guided_decoding(response_format: dict[str, Any] | None,
                                                              expected: GuidedDecoding | None) -> None:
    for cls, prompt in ((ChatCompletionRequest, {"messages": MESSAGES}), (CompletionRequest, {"prompt": "x"})):
        req = cls.model_validate({"model": "m", **prompt, "response_format": response_format})
        assert response_format_guided(req.response_format) == expected


def test_accepted_empty_values_of_unsupported_parameters_and_text_response_format() -> None:
    body = {"model": "m", "messages": MESSAGES, "tools": [], "logit_bias": {}, "response_format": {"type": "text"}}
    assert _error(ChatCompletionRequest, body) is None


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [("hello", ["hello"]), ([1, 2, 3], [[1, 2, 3]]), (["a", "b"], ["a", "b"]), ([[1], [2, 3]], [[1], [2, 3]])],
)
def test_completion_prompts_accept_text_token_ids_and_batches(prompt: Any, expected: list[Any]) -> None:
    req = CompletionRequest.model_validate({"model": "m", "prompt": prompt})
    assert req.prompts() == expected and req.max_tokens == 16


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"model": "m", "prompt": []}, "prompt", "invalid_value"),
        ({"model": "m", "prompt": [1, "a"]}, "prompt", "invalid_value"),
        ({"model": "m", "prompt": "x", "echo": True}, "echo", "unsupported_parameter"),
        ({"model": "m", "prompt": "x", "best_of": 3}, "best_of", "unsupported_parameter"),
        ({"model": "m", "prompt": "x", "logprobs": 9}, "logprobs", "invalid_value"),
    ],
)
def test_bad_completion_bodies_get_a_400_naming_the_field(body: dict[str, Any], param: str, code: str) -> None:
    error = _error(CompletionRequest, body)
    assert error is not None and (error.status_code, error.param, error.code) == (400, param, code)


def test_param_from_loc_drops_body_and_union_tags() -> None:
    assert param_from_loc(("body", "messages", 0, "content", "list[TextPart]", 1, "text")) == "messages[0].content[1].text"
    assert param_from_loc(("body",)) is None


def test_malformed_json_maps_to_invalid_json() -> None:
    error = from_validation_errors([{"type": "json_invalid", "loc": ("body", 3), "msg": "x"}])
    assert (error.status_code, error.code, error.param) == (400, "invalid_json", None)


def test_engine_errors_map_to_statuses_and_headers() -> None:
    too_long = from_engine_error(ContextLengthExceededError("too long"), "messages")
    assert (too_long.status_code, too_long.code, too_long.param) == (400, "context_length_exceeded", "messages")
    assert from_engine_error(InvalidRequestError("bad")).status_code == 400
    full = from_engine_error(QueueFullError("full", retry_after_s=2.2))
    assert full.status_code == 429 and full.headers["Retry-After"] == "3" and full.code == "rate_limit_exceeded"
    dead = from_engine_error(EngineDeadError("dead"))
    assert dead.status_code == 503
    for error in (too_long, full, dead):
        _assert_openai_shape(error.body())


def test_engine_errors_carry_their_field_as_data() -> None:
    bad = from_engine_error(InvalidParameter("top_p", "top_p must be in (0, 1], got 0.0"), "messages")
    assert (bad.status_code, bad.code, bad.param, bad.message) == (400, "invalid_value", "top_p",
                                                                   "top_p must be in (0, 1], got 0.0")
    exceeded = ContextLengthExceeded(max_model_len=64, num_prompt_tokens=60, requested_max_tokens=10)
    too_long = from_engine_error(exceeded, "prompt")
    assert (too_long.status_code, too_long.code, too_long.param) == (400, "context_length_exceeded", "prompt")
    assert too_long.message == ("This model's maximum context length is 64 tokens. However, you requested 70 tokens "
                                "(60 in the prompt and 10 in the completion). Please reduce the length of the prompt "
                                "or the completion.")
    for error in (bad, too_long):
        _assert_openai_shape(error.body())
    for exc in (InvalidParameter("stop", "stop must be non-empty strings, got ['']"), exceeded,
                ContextLengthExceeded(64, 200, None, prompt_is_lower_bound=True)):
        copy = pickle.loads(pickle.dumps(exc))
        assert type(copy) is type(exc) and str(copy) == str(exc) and vars(copy) == vars(exc)


def test_api_key_comparison_needs_the_bearer_scheme_and_the_exact_key() -> None:
    assert key_matches("Bearer sk-1", "sk-1") and key_matches("bearer sk-1", "sk-1")
    assert not key_matches(None, "sk-1")
    assert not key_matches("sk-1", "sk-1")
    assert not key_matches("Bearer sk-2", "sk-1")
    assert not key_matches("Bearer sk-1x", "sk-1")
    assert not key_matches("Bearer ключ", "sk-1")


JSON_SCALARS = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8)
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
FIELDS = ["model", "messages", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream",
          "stream_options", "logprobs", "top_logprobs", "metadata", "tools", "response_format", "top_k", "echo"]
BODIES = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), JSON_VALUES, max_size=6)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(body=BODIES, chat=st.booleans())
def test_any_body_either_validates_or_maps_to_an_openai_400(body: dict[str, Any], chat: bool) -> None:
    cls = ChatCompletionRequest if chat else CompletionRequest
    body = json.loads(json.dumps(body, allow_nan=True))
    error = _error(cls, body)
    if error is not None:
        assert error.status_code == 400
        _assert_openai_shape(error.body())
        json.dumps(error.body(), allow_nan=False)


# -- the app in-process (FastAPI TestClient) on the real engine and a tiny checkpoint -------------


@pytest.fixture(scope="module")
def app_client(checkpoint_factory: Any) -> Any:
    from fastapi.testclient import TestClient

    from moe_serve.engine.builder import build_async_engine
    from moe_serve.engine.config import EngineConfig
    from moe_serve.server.app import ServerOptions, create_app

    engine = build_async_engine(EngineConfig(model=str(checkpoint_factory("mixtral")), dtype="float32", device="cpu",
                                             max_model_len=64, max_waiting=8))
    engine.start(wait=True, timeout=120)
    with TestClient(create_app(engine, ServerOptions(served_model_name="tiny", max_request_bytes=4096))) as client:
        yield client
    engine.shutdown()


def test_health_reports_engine_stats_and_version_is_served(app_client: Any) -> None:
    health = app_client.get("/health")
    assert health.status_code == 200
    assert health.json() | {"num_running": 0} == {"status": "ok", "model": "tiny", "num_running": 0,
                                                    "num_waiting": 0, "kv_cache_usage": 0.0}
    assert app_client.get("/version").json()["version"]


def test_the_openapi_document_has_the_request_bodies_and_docs_are_off_by_default(app_client: Any) -> None:
    document = app_client.get("/openapi.json").json()
    schemas = document["components"]["schemas"]
    for path, model in (("/v1/chat/completions", "ChatCompletionRequest"), ("/v1/completions", "CompletionRequest")):
        ref = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref == f"#/components/schemas/{model}" and "messages" in schemas["ChatCompletionRequest"]["properties"]
    refs = {value for value in _walk(document) if isinstance(value, str) and value.startswith("#/")}
    assert all(ref.removeprefix("#/components/schemas/") in schemas for ref in refs)  # every reference resolves
    assert app_client.get("/docs").status_code == 404 and app_client.get("/redoc").status_code == 404


def _walk(value: Any) -> Any:
    if isinstance(value, dict):
        for item in value.values():
            yield from _walk(item)
    elif isinstance(value, list):
        for item in value:
            yield from _walk(item)
    else:
        yield value


def test_the_docs_page_needs_no_network(app_client: Any) -> None:
    from fastapi.testclient import TestClient

    from moe_serve.server.app import ServerOptions, create_app

    engine = app_client.app.state.serving.engine
    with TestClient(create_app(engine, ServerOptions(served_model_name="tiny", docs=True))) as client:
        page = client.get("/docs")
        assert page.status_code == 200 and "SwaggerUIBundle" in page.text
        assert "http://" not in page.text and "https://" not in page.text
        assets = re.findall(r'(?:href|src)="([^"]+)"', page.text)
        assert len(assets) == 3
        for asset in assets:
            assert client.get(asset).status_code == 200 and asset.startswith("/docs/assets/")


def test_health_and_metrics_can_be_put_behind_the_key(app_client: Any) -> None:
    from fastapi.testclient import TestClient

    from moe_serve.server.app import ServerOptions, create_app

    engine = app_client.app.state.serving.engine
    for protect in (False, True):
        options = ServerOptions(served_model_name="tiny", api_key="sk-1", protect_health_and_metrics=protect)
        with TestClient(create_app(engine, options)) as client:
            for path in ("/health", "/metrics"):
                assert client.get(path).status_code == (401 if protect else 200)
                assert client.get(path, headers={"Authorization": "Bearer sk-1"}).status_code == 200
            assert client.get("/version").status_code == 200


def test_a_body_over_the_limit_is_413_and_unknown_routes_are_openai_404s(app_client: Any) -> None:
    too_big = app_client.post("/v1/completions", content=b"x" * 5000, headers={"Content-Type": "application/json"})
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_too_large"
    missing = app_client.get("/v2/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_loading_and_dead_engines_answer_503(tmp_path: Any) -> None:
    from fastapi.testclient import TestClient

    from moe_serve.engine.builder import build_async_engine
    from moe_serve.engine.config import EngineConfig
    from moe_serve.server.app import ServerOptions, create_app

    loading = build_async_engine(EngineConfig(model=str(tmp_path / "absent")))
    with TestClient(create_app(loading, ServerOptions(served_model_name="m"))) as client:
        assert client.get("/health").json()["status"] == "loading"
        busy = client.post("/v1/completions", json={"model": "m", "prompt": "x"})
        assert busy.status_code == 503 and busy.headers["Retry-After"] and busy.json()["error"]["code"] == "model_loading"
        with pytest.raises(ModelLoadError):
            loading.start(wait=True, timeout=60)
        assert loading.is_dead and client.get("/health").status_code == 503
        dead = client.post("/v1/completions", json={"model": "m", "prompt": "x"})
        assert dead.status_code == 503 and dead.json()["error"]["code"] == "engine_dead"


SMALL_INTS = st.integers(-3, 6)
CHAT_FIELDS = st.fixed_dictionaries(
    {"model": st.sampled_from(["tiny", "other"]),
     "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "bot"]),
                                                 "content": st.text(max_size=20) | st.integers()}), max_size=3)},
    optional={"max_tokens": SMALL_INTS, "n": SMALL_INTS, "temperature": st.floats(-1, 3), "top_p": st.floats(-0.5, 1.5),
              "top_k": SMALL_INTS, "seed": st.integers(-(2**64), 2**64), "stop": st.text(max_size=3) | JSON_VALUES,
              "stream": st.booleans(), "logprobs": st.booleans(), "top_logprobs": SMALL_INTS,
              "min_tokens": SMALL_INTS, "repetition_penalty": st.floats(-1, 3), "metadata": JSON_VALUES,
              "presence_penalty": st.floats(-3, 3), "ignore_eos": st.booleans(), "tools": JSON_VALUES},
)


@settings(max_examples=80, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
          deadline=None)
@given(body=CHAT_FIELDS | BODIES)
def test_no_request_body_gets_a_5xx_from_the_real_engine(app_client: Any, body: dict[str, Any]) -> None:
    response = app_client.post("/v1/chat/completions", content=json.dumps(body, allow_nan=True),
                               headers={"Content-Type": "application/json"})
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        _assert_openai_shape(response.json())
    elif body.get("stream"):
        assert response.text.rstrip().endswith("data: [DONE]") and '"error"' not in response.text
    else:
        assert response.json()["object"] == "chat.completion"


def test_responses_input_items_become_template_messages() -> None:
    req = ResponsesRequest.model_validate({"model": "m", "input": [
        {"role": "developer", "content": "Be terse."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "Checking.", "annotations": []}]},
        {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "get_weather", "arguments": '{"c": 1}'},
        {"type": "function_call", "call_id": "call_2", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "rain"},
    ]})
    assert input_messages(req.input) == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"c": 1}}},
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": {}}}]},
        {"role": "tool", "content": "rain", "tool_call_id": "call_1"},
    ]
    assert input_messages("hi") == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(("body", "param"), [
    ({"input": [{"type": "image", "url": "x"}]}, "input[0]"),
    ({"input": "x", "reasoning": {"effort": "low"}}, "reasoning"),
    ({"input": "x", "tool_choice": {"type": "function", "name": "f"}}, "tool_choice"),
    ({"input": "x", "text": {"format": {"type": "text", "schema": {}}}}, "text.format.schema"),
])
def test_bad_responses_bodies_name_the_field(body: dict[str, Any], param: str) -> None:
    error = _error(ResponsesRequest, {"model": "m", **body})
    assert error is not None and error.status_code == 400 and error.param == param


def test_responses_text_format_maps_to_guided_decoding() -> None:
    req = ResponsesRequest.model_validate({"model": "m", "input": "x", "text": {"format": {
        "type": "json_schema", "name": "a", "schema": {"type": "object"}, "strict": True}}})
    assert req.guided() == GuidedDecoding.json_schema({"type": "object"}, strict=True, param="text.format.schema")
    assert ResponsesRequest.model_validate({"model": "m", "input": "x"}).guided() is None


def test_the_response_store_keeps_the_most_recently_used() -> None:
    store = ResponseStore(max_responses=2)
    for name in ("a", "b"):
        store.put(name, StoredResponse({"id": name}, []))
    store.get("a")
    store.put("c", StoredResponse({"id": "c"}, []))
    assert len(store) == 2 and store.get("a").body == {"id": "a"}
    with pytest.raises(APIError) as error:
        store.get("b", "previous_response_id")
    assert (error.value.status_code, error.value.param) == (404, "previous_response_id")
