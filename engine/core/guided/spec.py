"""What a request's output must match (grammar-constrained decoding), as a hashable value, and the
typed error a spec the grammar library cannot compile raises. No torch or grammar-library import:
the server builds these, the engine compiles them (`guided.compiler`)."""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from moe_serve.engine.errors import InvalidParameter


class GuidedKind(str, enum.Enum):
    """The forms of constraint."""

    JSON_OBJECT = "json_object"  # any JSON object
    JSON_SCHEMA = "json_schema"  # a JSON value matching a JSON Schema
    REGEX = "regex"  # text matching a regular expression (the whole output)
    GRAMMAR = "grammar"  # a Lark-style (EBNF) grammar, `start` its start rule
    TAGGED_JSON = "tagged_json"  # begin + JSON matching one of N schemas + end, once or several times


class GuidedCompileError(InvalidParameter):
    """A guided-decoding spec is invalid or cannot be compiled (maps to 400 naming `param`):
    `part` is the offending piece (a schema's JSON text, the regex, the library's message)."""

    code = "invalid_value"

    def __init__(self, param: str, message: str, part: str = "") -> None:
        super().__init__(param, message)
        self.part = part

    def __reduce__(self) -> tuple[type[GuidedCompileError], tuple[str, str, str]]:  # type: ignore[override]
        return type(self), (self.param, str(self), self.part)


def _schema_text(schema: Mapping[str, Any] | bool, param: str) -> str:
    """A JSON Schema as compact JSON text (key order kept: it is the output's property order)."""
    if not isinstance(schema, (Mapping, bool)):
        raise GuidedCompileError(param, f"{param} must be a JSON Schema object, got {type(schema).__name__}")
    try:
        return json.dumps(schema, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise GuidedCompileError(param, f"{param} is not valid JSON: {exc}") from exc


@dataclass(frozen=True)
class GuidedDecoding:
    """A request's output constraint. Build one with the class methods; `param` is the API field a
    compile error names (the server passes its own field path, e.g. `response_format.json_schema`).

    The JSON forms produce compact JSON (no optional whitespace). `strict` (json_schema,
    tagged_json) forbids properties a schema does not list unless it allows them explicitly.
    """

    kind: GuidedKind
    source: str = ""  # json_schema: the schema's JSON text; regex: the pattern; grammar: the grammar
    strict: bool = True
    begin: str = ""  # tagged_json: the literal before each JSON value
    end: str = ""  # tagged_json: the literal after each JSON value
    schemas: tuple[str, ...] = ()  # tagged_json: the schemas' JSON texts (the value matches one of them)
    multiple: bool = False  # tagged_json: one or more items, joined by `separator`
    separator: str = ""
    param: str = "response_format"
    schema_params: tuple[str, ...] = ()  # tagged_json: the API field of each schema, for errors

    @classmethod
    def json_object(cls, param: str = "response_format") -> GuidedDecoding:
        """Any JSON object."""
        return cls(GuidedKind.JSON_OBJECT, param=param)

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any] | bool, strict: bool = True,
                    param: str = "response_format") -> GuidedDecoding:
        """A JSON value valid against `schema` (a JSON Schema, as a dict)."""
        return cls(GuidedKind.JSON_SCHEMA, _schema_text(schema, param), strict=strict, param=param)

    @classmethod
    def regex(cls, pattern: str, param: str = "regex") -> GuidedDecoding:
        """Text that `pattern` matches in full."""
        return cls(GuidedKind.REGEX, pattern, param=param)

    @classmethod
    def grammar(cls, grammar: str, param: str = "grammar") -> GuidedDecoding:
        """Text the Lark-style grammar derives from its `start` rule."""
        return cls(GuidedKind.GRAMMAR, grammar, param=param)

    @classmethod
    def tagged_json(cls, begin: str, end: str, schemas: Sequence[Mapping[str, Any]], multiple: bool = False,
                    separator: str = "\n", strict: bool = True, param: str = "tools",
                    schema_params: Sequence[str] | None = None) -> GuidedDecoding:
        """`begin + value + end`, the value a JSON value valid against one of `schemas`; with
        `multiple`, one or more such items joined by `separator`. E.g. Hermes tool calls:
        begin `<tool_call>\\n`, end `\\n</tool_call>`, one schema per function. The text of one of
        the tokenizer's special tokens in begin, end or separator (Mistral's `[TOOL_CALLS]`) is that
        token. `schema_params` names each schema's API field (default `param[i]`)."""
        names = tuple(schema_params) if schema_params is not None else tuple(f"{param}[{i}]" for i in range(len(schemas)))
        if len(names) != len(schemas):
            raise ValueError(f"{len(schemas)} schemas but {len(names)} schema_params")
        texts = tuple(_schema_text(schema, name) for schema, name in zip(schemas, names))
        return cls(GuidedKind.TAGGED_JSON, begin=begin, end=end, schemas=texts, multiple=multiple,
                   separator=separator, strict=strict, param=param, schema_params=names)

    @property
    def key(self) -> tuple[object, ...]:
        """What the compiled grammar depends on (the compile cache's key; `param`s excluded)."""
        return (self.kind, self.source, self.strict, self.begin, self.end, self.schemas, self.multiple,
                self.separator)

    def validate(self) -> None:
        """Raise GuidedCompileError for a spec that cannot be compiled whatever the tokenizer."""
        if self.kind in (GuidedKind.REGEX, GuidedKind.GRAMMAR, GuidedKind.JSON_SCHEMA) and not self.source:
            raise GuidedCompileError(self.param, f"{self.param} must not be empty")
        if self.kind is GuidedKind.TAGGED_JSON and not self.schemas:
            raise GuidedCompileError(self.param, f"{self.param} must list at least one schema")
