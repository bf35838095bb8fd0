"""Grammar-constrained decoding on the tiny random model (whose outputs are never JSON unprompted):
sampled outputs always match their spec, unconstrained rows of a mixed batch are untouched, the
end-of-sequence token only where the grammar accepts, compile errors name their param."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import llguidance
import pytest
import torch

from moe_serve.engine.builder import build_engine
from moe_serve.engine.config import EngineConfig
from moe_serve.engine.core.async_engine import AsyncLLMEngine
from moe_serve.engine.core.guided.compiler import GuidedCompiler, strict_schema
from moe_serve.engine.core.guided.matcher import byte_bias_table, compute_masks, mask_bias
from moe_serve.engine.core.guided.spec import GuidedCompileError, GuidedDecoding
from moe_serve.engine.core.request import EngineRequest
from moe_serve.engine.core.sampler import Sampler
from moe_serve.engine.core.sampling_params import FinishReason, SamplingParams

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "active": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "active", "tags"],
    "additionalProperties": False,
}
TABLE = byte_bias_table(torch.device("cpu"))
WEATHER = {"type": "object", "properties": {"name": {"const": "get_weather"}, "arguments": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"]}},
    "required": ["name", "arguments"]}
TIME = {"type": "object", "properties": {"name": {"const": "get_time"}, "arguments": {
    "type": "object", "properties": {"utc": {"type": "boolean"}}, "required": ["utc"]}},
    "required": ["name", "arguments"]}


def validate(instance: Any, schema: dict[str, Any]) -> None:
    """jsonschema's check when it is installed, else the keys and types of PERSON by hand."""
    try:
        import jsonschema
    except ImportError:
        assert schema is PERSON and set(instance) == set(PERSON["required"])
        assert isinstance(instance["name"], str) and len(instance["name"]) <= 6
        assert isinstance(instance["age"], int) and 0 <= instance["age"] <= 120
        assert instance["role"] in ("admin", "user", "guest") and isinstance(instance["active"], bool)
        assert isinstance(instance["tags"], list) and all(isinstance(t, str) for t in instance["tags"])
        return
    jsonschema.validate(instance, schema)


@pytest.fixture(scope="module")
def engine(checkpoint_factory):
    path = checkpoint_factory("mixtral")
    return build_engine(EngineConfig(model=str(path), dtype="float32", max_num_seqs=32), show_progress=False)


def run(engine, requests: list[EngineRequest]) -> dict[str, tuple[list[int], str, FinishReason]]:
    """Add `requests` together and step until all finish: tokens, text and finish reason of each."""
    for request in requests:
        engine.add_request(request)
    results: dict[str, tuple[list[int], str, FinishReason | None]] = {r.request_id: ([], "", None) for r in requests}
    while engine.has_unfinished:
        for out in engine.step():
            assert out.error is None, out.error
            tokens, text, _ = results[out.request_id]
            results[out.request_id] = (tokens + out.new_token_ids, text + out.new_text, out.finish_reason)
    return results  # type: ignore[return-value]


def sampled(guided: GuidedDecoding | None, max_tokens: int = 200, seed: int | None = None,
            **kwargs: Any) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed, guided=guided, **kwargs)


def prompt(i: int, vocab: int) -> list[int]:
    return torch.randint(0, vocab, (5 + i % 7,), generator=torch.Generator().manual_seed(i)).tolist()


def test_sampled_json_schema_outputs_always_parse_and_validate(engine) -> None:
    spec = GuidedDecoding.json_schema(PERSON, strict=True)
    requests = [EngineRequest(f"r{i}", prompt(i, engine.vocab_size), sampled(spec, seed=i)) for i in range(24)]
    results = run(engine, requests)
    for tokens, text, reason in results.values():
        assert reason is FinishReason.STOP
        validate(json.loads(text), PERSON)
    assert len({text for _, text, _ in results.values()}) > 12  # sampled, not one forced answer


def test_unconstrained_sampling_of_the_random_model_is_not_json(engine) -> None:
    requests = [EngineRequest(f"u{i}", prompt(i, engine.vocab_size), sampled(None, max_tokens=20, seed=i))
                for i in range(8)]
    for _, text, _ in run(engine, requests).values():
        with pytest.raises(ValueError):
            json.loads(text)


def test_json_object_regex_and_lark_grammar_outputs_match(engine) -> None:
    regex = r"(yes|no): [0-9]{2,4}"
    lark = 'start: "(" NUM ("+" NUM)* ")"\nNUM: /[1-9][0-9]?/\n'
    specs = {"object": GuidedDecoding.json_object(), "regex": GuidedDecoding.regex(regex),
             "lark": GuidedDecoding.grammar(lark)}
    requests = [EngineRequest(f"{name}{i}", prompt(i, engine.vocab_size), sampled(spec, max_tokens=80, seed=i))
                for name, spec in specs.items() for i in range(6)]
    results = run(engine, requests)
    objects = [(text, reason) for request_id, (_, text, reason) in results.items() if request_id.startswith("object")]
    # a free JSON object can outlast max_tokens on random weights (its strings never close on purpose)
    assert any(reason is FinishReason.STOP for _, reason in objects)
    for text, reason in objects:
        assert isinstance(json.loads(text), dict) if reason is FinishReason.STOP else text.startswith("{")
    for request_id, (_, text, reason) in results.items():
        if request_id.startswith("object"):
            continue
        if request_id.startswith("regex"):
            assert reason is FinishReason.STOP and re.fullmatch(regex, text), text
        elif request_id.startswith("lark"):
            assert reason is FinishReason.STOP and re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)*\)", text), text


def test_tagged_json_gives_one_or_several_tool_calls_each_matching_one_schema(engine) -> None:
    begin, end = "<tool_call>\n", "\n</tool_call>"
    one = GuidedDecoding.tagged_json(begin, end, [WEATHER, TIME])
    several = GuidedDecoding.tagged_json(begin, end, [WEATHER, TIME], multiple=True, separator="\n")
    requests = [EngineRequest(f"{kind}{i}", prompt(i, engine.vocab_size), sampled(spec, max_tokens=300, seed=i))
                for kind, spec in (("one", one), ("several", several)) for i in range(6)]
    item = re.escape(begin) + r"(.*?)" + re.escape(end)
    for request_id, (_, text, reason) in run(engine, requests).items():
        assert reason is FinishReason.STOP
        assert re.fullmatch(f"{item}(\n{item})*", text, flags=re.S), text
        calls = [json.loads(body) for body in re.findall(item, text, flags=re.S)]
        assert len(calls) == 1 or request_id.startswith("several")
        for call in calls:
            validate(call, WEATHER if call["name"] == "get_weather" else TIME)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_a_special_token_in_a_tagged_json_marker_is_that_token(engine, skip_special_tokens: bool) -> None:
    marker = "<|im_start|>"  # a special token of the test tokenizer, as Mistral's [TOOL_CALLS] is of Mistral's
    spec = GuidedDecoding.tagged_json(marker, "", [TIME])
    params = sampled(spec, seed=0, skip_special_tokens=skip_special_tokens)
    [(tokens, text, reason)] = run(engine, [EngineRequest("special", prompt(0, engine.vocab_size), params)]).values()
    assert reason is FinishReason.STOP and tokens[0] == engine.tokenizer.convert_tokens_to_ids(marker)
    assert text.startswith(marker) != skip_special_tokens
    validate(json.loads(text.removeprefix(marker)), TIME)


def test_unconstrained_rows_of_a_mixed_batch_equal_the_unconstrained_run(engine) -> None:
    vocab = engine.vocab_size
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    plain = [EngineRequest(f"p{i}", prompt(i, vocab), greedy) for i in range(4)]
    alone = run(engine, plain)
    spec = GuidedDecoding.json_schema(PERSON)
    mixed = [EngineRequest(f"p{i}", prompt(i, vocab), greedy) for i in range(4)]
    mixed += [EngineRequest(f"g{i}", prompt(i, vocab), sampled(spec, seed=i)) for i in range(4)]
    mixed += [EngineRequest(f"q{i}", prompt(i, vocab), SamplingParams(max_tokens=200, temperature=0.0, guided=spec))
              for i in range(4)]
    together = run(engine, mixed)
    for i in range(4):
        assert together[f"p{i}"][0] == alone[f"p{i}"][0]
        validate(json.loads(together[f"g{i}"][1]), PERSON)
        validate(json.loads(together[f"q{i}"][1]), PERSON)  # greedy constrained rows too


def test_max_tokens_cuts_a_constrained_output_with_finish_reason_length(engine) -> None:
    spec = GuidedDecoding.json_schema(PERSON)
    [(tokens, text, reason)] = run(engine, [EngineRequest("cut", prompt(0, engine.vocab_size),
                                                          sampled(spec, max_tokens=4, seed=0))]).values()
    assert reason is FinishReason.LENGTH and len(tokens) == 4 and text == '{"name":'


def test_eos_is_allowed_only_where_the_grammar_accepts(engine) -> None:
    tokenizer, executor = engine.tokenizer, llguidance.LLExecutor()
    eos = tokenizer.eos_token_id
    tokens = [tokenizer.convert_tokens_to_ids(c) for c in "abcd"]  # one byte-level token per letter
    matcher = engine.guided.matcher(GuidedDecoding.regex("ab(cd)?"))
    for i, token in enumerate(tokens):
        masks = compute_masks([None, matcher], executor, engine.vocab_size, TABLE)
        allowed = masks.bias[0] == 0
        assert masks.rows == [1] and bool(allowed[token])
        assert bool(allowed[eos]) == (i == 2)  # after "ab" only
        assert matcher.accept(token)
        assert matcher.is_finished == (i == 3)
    allowed = compute_masks([matcher], executor, engine.vocab_size, TABLE).bias[0] == 0
    assert allowed.nonzero().flatten().tolist() == [eos] and matcher.is_finished


def test_mask_bias_is_zero_exactly_at_the_set_bits() -> None:
    vocab = 70  # three words, the last one partly padding
    bitmask = torch.randint(-2**31, 2**31 - 1, (4, 3), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    bias = mask_bias(bitmask, vocab, TABLE)
    expected = torch.tensor([[(int(bitmask[r, t // 32]) >> (t % 32)) & 1 for t in range(vocab)] for r in range(4)])
    assert bias.shape == (4, vocab) and torch.equal(bias == 0, expected.bool())
    assert torch.equal(bias != 0, bias == float("-inf"))


def test_the_sampler_masks_only_constrained_rows(engine) -> None:
    vocab = engine.vocab_size
    matcher = engine.guided.matcher(GuidedDecoding.regex("[0-9]+"))
    masks = compute_masks([None, matcher, None], llguidance.LLExecutor(), vocab, TABLE)
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=0.0)] * 3
    out = Sampler(vocab)(logits, params, [[1]] * 3, [[]] * 3, [None] * 3, frozenset(), masks)
    assert out.token_ids[0] == int(logits[0].argmax()) and out.token_ids[2] == int(logits[2].argmax())
    best_digit = int((logits[1] + masks.bias[0]).argmax())
    assert out.token_ids[1] == best_digit and engine.tokenizer.decode([best_digit]).isdigit()
    assert out.logprobs == [None] * 3 and out.errors == [None] * 3
    every_row = compute_masks([matcher], llguidance.LLExecutor(), vocab, TABLE)  # the one-pass path
    alone = Sampler(vocab)(logits[1:2], params[:1], [[1]], [[]], [None], frozenset(), every_row)
    assert alone.token_ids == [best_digit]


@pytest.mark.parametrize(("spec", "param", "part"), [
    (GuidedDecoding.json_schema({"type": "object", "properties": {"a": {"type": "strin"}}},
                                param="response_format.json_schema.schema"),
     "response_format.json_schema.schema", "strin"),
    (GuidedDecoding.regex("a(b", param="regex"), "regex", "unclosed group"),
    (GuidedDecoding.grammar("start: foo\n", param="grammar"), "grammar", "foo"),
    (GuidedDecoding.tagged_json("<a>", "</a>", [WEATHER, {"type": "object", "$ref": "#/nowhere"}],
                                schema_params=["tools[0].function", "tools[1].function"]),
     "tools[1].function", "nowhere"),
])
def test_a_spec_that_cannot_compile_is_rejected_when_validated_naming_its_param(engine, spec, param, part) -> None:
    request = EngineRequest("bad", [1, 2, 3], SamplingParams(guided=spec))
    with pytest.raises(GuidedCompileError) as caught:
        engine.validate(request)
    assert caught.value.param == param and part in str(caught.value) and caught.value.code == "invalid_value"
    assert not engine.has_unfinished


def test_an_async_request_with_a_bad_schema_fails_before_its_stream_starts(engine) -> None:
    async_engine = AsyncLLMEngine.from_engine(engine)
    async_engine.start(wait=True)
    spec = GuidedDecoding.json_schema({"type": "nope"}, param="text.format.schema")

    async def first_output() -> None:
        async for _ in async_engine.generate(EngineRequest("bad", [1, 2], SamplingParams(guided=spec))):
            pass

    try:
        with pytest.raises(GuidedCompileError, match="text.format.schema"):
            asyncio.run(first_output())
    finally:
        async_engine.shutdown()


def test_compiles_are_cached_by_spec_and_bounded(engine) -> None:
    compiler = GuidedCompiler(engine.tokenizer, engine.vocab_size, {engine.tokenizer.eos_token_id}, cache_size=2)
    first = compiler.compile(GuidedDecoding.regex("a+", param="x"))
    assert compiler.compile(GuidedDecoding.regex("a+", param="y")) is first  # the param is not part of the key
    compiler.compile(GuidedDecoding.regex("b+"))
    compiler.compile(GuidedDecoding.regex("c+"))
    assert compiler.num_cached == 2
    assert compiler.compile(GuidedDecoding.regex("a+")) is not first  # dropped as least recently used


def test_a_tokenizer_the_library_cannot_read_makes_constrained_requests_fail_with_a_400_error() -> None:
    class NotATokenizer:
        def __len__(self) -> int:
            return 8

    compiler = GuidedCompiler(NotATokenizer(), 8, {0})
    with pytest.raises(GuidedCompileError, match="not available for this model's tokenizer") as caught:
        compiler.compile(GuidedDecoding.json_object(param="response_format"))
    assert caught.value.param == "response_format"


def test_strict_schemas_forbid_unlisted_properties_at_every_level() -> None:
    schema = {"type": "object", "properties": {"type": {"type": "object", "properties": {"x": {"type": "integer"}}},
                                               "list": {"type": "array", "items": {"properties": {}}}},
              "$defs": {"d": {"type": "object", "additionalProperties": True}}}
    strict = strict_schema(schema)
    assert strict["additionalProperties"] is False
    assert strict["properties"]["type"]["additionalProperties"] is False
    assert "additionalProperties" not in strict["properties"]  # a property named "type" is not a schema keyword
    assert strict["properties"]["list"]["items"]["additionalProperties"] is False
    assert strict["$defs"]["d"]["additionalProperties"] is True
    assert "additionalProperties" not in schema  # the caller's schema is not changed
