"""Compiles guided-decoding specs into llguidance grammars for the engine's tokenizer, with a
bounded cache keyed by spec, and hands out a fresh matcher per sequence. Safe to call from the
event loop (validation) and the engine thread at once. Why llguidance: docs/structured_outputs.md."""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

import llguidance
import llguidance.hf

from moe_serve.engine.core.guided.matcher import GuidedMatcher
from moe_serve.engine.core.guided.spec import GuidedCompileError, GuidedDecoding, GuidedKind

logger = logging.getLogger(__name__)

DEFAULT_CACHE_SIZE = 256
# compact JSON: no optional whitespace, so a model cannot pad forever between tokens
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False}
# schema keywords whose values are schemas: name -> schema maps, lists of schemas, single schemas
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_VALUES = ("items", "additionalProperties", "additionalItems", "unevaluatedProperties", "not", "if",
                  "then", "else", "contains", "propertyNames")


def strict_schema(schema: Any) -> Any:
    """`schema` with `additionalProperties: false` on every object schema that does not say
    (OpenAI's strict mode: only the listed properties)."""
    if isinstance(schema, list):  # `items` as a list (older drafts)
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: strict_schema(sub) for name, sub in out[key].items()}
    for key in _SCHEMA_LISTS + _SCHEMA_VALUES:
        if key in out:
            out[key] = strict_schema(out[key])
    if ("properties" in out or out.get("type") == "object") and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _json_schema(text: str, strict: bool) -> dict[str, Any] | bool:
    """The schema with the compact-JSON options (a schema's own `x-guidance` wins)."""
    schema = json.loads(text)
    if strict:
        schema = strict_schema(schema)
    if isinstance(schema, dict):
        schema = {**schema, "x-guidance": {**JSON_OPTIONS, **schema.get("x-guidance", {})}}
    return schema


def _lark_literal(text: str, special_tokens: Mapping[str, int]) -> str:
    """`text` as Lark terms: quoted strings, and `<[id]>` for each special token's text in it (a
    marker such as Mistral's `[TOOL_CALLS]` is one special token, never its characters)."""
    if not text:
        return '""'
    if not special_tokens:
        return json.dumps(text, ensure_ascii=False)
    pattern = "|".join(re.escape(t) for t in sorted(special_tokens, key=len, reverse=True))
    parts = re.split(f"({pattern})", text)
    return " ".join(f"<[{special_tokens[part]}]>" if part in special_tokens else json.dumps(part, ensure_ascii=False)
                    for part in parts if part)


def grammar_text(spec: GuidedDecoding, special_tokens: Mapping[str, int]) -> str:
    """The llguidance grammar of `spec` (not yet checked); `special_tokens`: text -> id of the
    tokenizer's special tokens, matched as tokens in tagged_json's literals."""
    if spec.kind is GuidedKind.JSON_OBJECT:
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    if spec.kind is GuidedKind.JSON_SCHEMA:
        return llguidance.LLMatcher.grammar_from_json_schema(_json_schema(spec.source, spec.strict))
    if spec.kind is GuidedKind.REGEX:
        return llguidance.LLMatcher.grammar_from_regex(spec.source)
    if spec.kind is GuidedKind.GRAMMAR:
        return llguidance.LLMatcher.grammar_from_lark(spec.source)
    values = " | ".join(f"%json {json.dumps(_json_schema(s, spec.strict))}" for s in spec.schemas)
    items = f"item ({_lark_literal(spec.separator, special_tokens)} item)*" if spec.multiple else "item"
    lark = (f"start: {items}\n"
            f"item: {_lark_literal(spec.begin, special_tokens)} value {_lark_literal(spec.end, special_tokens)}\n"
            f"value: {values}\n")
    return llguidance.LLMatcher.grammar_from_lark(lark)


class GuidedCompiler:
    """Spec -> checked grammar (cached, at most `cache_size` specs, least recently used dropped)
    -> a matcher per sequence. The llguidance view of the tokenizer (about 0.8 s at 32k tokens) is
    built on a background thread from construction on, so the first constrained request does
    not build it on the event loop; a compile before it is ready waits for it."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Iterable[int],
                 cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        """`vocab_size`: the model's logits width (the masks cover at least that many tokens)."""
        self._hf_tokenizer = tokenizer
        self.vocab_size = max(vocab_size, len(tokenizer))
        self._eos_token_ids = sorted(eos_token_ids)
        self.cache_size = cache_size
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._special_tokens: dict[str, int] = {}
        self._cache: OrderedDict[tuple[object, ...], llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()
        threading.Thread(target=self._prepare, name="moe-serve-guided-tokenizer", daemon=True).start()

    @property
    def num_cached(self) -> int:
        return len(self._cache)

    def _ll_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer, n_vocab=self.vocab_size,
                                                               eos_token=self._eos_token_ids)
                self._special_tokens = {text: token_id for text, token_id in self._hf_tokenizer.get_added_vocab().items()
                                        if self._tokenizer.is_special_token(token_id)}
            return self._tokenizer

    def _prepare(self) -> None:
        """Build the tokenizer view now (a failure is met again, as a GuidedCompileError, by the
        first compile)."""
        try:
            self._ll_tokenizer()
        except Exception as exc:  # noqa: BLE001 - reported per request; the engine serves everything else
            logger.warning("guided decoding is not available for this tokenizer: %s", exc)

    def compile(self, spec: GuidedDecoding) -> llguidance.LLMatcher:
        """The spec's checked matcher at its start (shared: copy it before advancing); raises
        GuidedCompileError naming the spec's param (for tagged_json, the schema that fails)."""
        with self._lock:
            template = self._cache.get(spec.key)
            if template is not None:
                self._cache.move_to_end(spec.key)
                return template
        template = self._build(spec)
        with self._lock:
            self._cache[spec.key] = template
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return template

    def matcher(self, spec: GuidedDecoding) -> GuidedMatcher:
        """A new sequence's matcher for `spec` (compiled or taken from the cache)."""
        return GuidedMatcher(self.compile(spec).deep_copy(), self.vocab_size)

    def _build(self, spec: GuidedDecoding) -> llguidance.LLMatcher:
        try:
            tokenizer = self._ll_tokenizer()
        except Exception as exc:  # noqa: BLE001 - whatever the library raises for a tokenizer it cannot read
            raise GuidedCompileError(spec.param, f"{spec.param}: guided decoding is not available for this model's "
                                                 f"tokenizer ({exc})") from exc
        try:
            grammar = grammar_text(spec, self._special_tokens)
        except ValueError as exc:  # llguidance rejects a schema that is not a JSON object or boolean
            raise GuidedCompileError(spec.param, f"{spec.param}: {exc}", str(exc)) from exc
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if not matcher.is_error():
            return matcher
        error = matcher.get_error()
        if spec.kind is GuidedKind.TAGGED_JSON:  # name the first schema that fails on its own
            for schema, param in zip(spec.schemas, spec.schema_params):
                alone = GuidedDecoding(GuidedKind.JSON_SCHEMA, schema, strict=spec.strict, param=param)
                try:
                    message = llguidance.LLMatcher.validate_grammar(grammar_text(alone, {}), tokenizer)
                except ValueError as exc:
                    message = str(exc)
                if message:
                    raise GuidedCompileError(param, f"{param}: {message}", schema)
        raise GuidedCompileError(spec.param, f"{spec.param}: {error}", error)
