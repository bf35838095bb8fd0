"""Request bodies of the OpenAI-compatible API as pydantic models.

Unknown fields are rejected (extra="forbid"); OpenAI parameters this server does not
implement are declared so that any non-empty value is rejected with a 400 naming them,
never silently ignored. Types are strict (`"10"` or `true` is no integer, `"yes"` no boolean;
a float field still takes an integer, as OpenAI's do). Response bodies live in `server.responses`.
"""

from __future__ import annotations

import enum
import json
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

MAX_N = 16
MAX_STOP_SEQUENCES = 8
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5
MAX_TOOLS = 128
TASK_NAME_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"
# Every request model: unknown fields rejected, no type coercion.
STRICT = ConfigDict(extra="forbid", strict=True)


def _reject_if_set(value: Any, info: ValidationInfo) -> Any:
    if value in (None, False, "", [], {}):
        return value
    raise PydanticCustomError(
        "unsupported_parameter", "'{name}' is not supported by this server", {"name": info.field_name}
    )


Unsupported = Annotated[
    Any,
    AfterValidator(_reject_if_set),
    Field(default=None, description="Not supported: a non-empty value is rejected with 400."),
]


class Role(str, enum.Enum):
    """Who wrote a chat message (`developer` is rendered as `system`; `tool` carries a call's result)."""

    SYSTEM = "system"
    DEVELOPER = "developer"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"


FUNCTION_NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"


class FunctionDefinition(BaseModel):
    """A function the model may call: its name, what it does, its parameters' JSON Schema."""

    model_config = STRICT

    name: str = Field(pattern=FUNCTION_NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def parameters_schema(self) -> dict[str, Any]:
        """The parameters' schema; a function without one takes an empty object."""
        return self.parameters if self.parameters is not None else {"type": "object", "properties": {}}


class ChatTool(BaseModel):
    """One entry of `tools` (function tools only)."""

    model_config = STRICT

    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    model_config = STRICT

    name: str


class NamedToolChoice(BaseModel):
    """tool_choice naming the function the model must call."""

    model_config = STRICT

    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


def check_tool_choice(choice: ToolChoice | None, names: list[str]) -> None:
    """Raise a validation error when `choice` needs a tool that `names` lacks."""
    if choice == "required" and not names:
        raise PydanticCustomError("value_error", "tool_choice 'required' needs tools")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise PydanticCustomError("value_error", "tool_choice names function '{name}', which is not in tools",
                                  {"name": choice.function.name})


class FunctionCall(BaseModel):
    """A call the assistant made: the function's name and its arguments as JSON text."""

    model_config = STRICT

    name: str
    arguments: str


class MessageToolCall(BaseModel):
    """One `tool_calls` entry of an assistant message sent back in the conversation."""

    model_config = STRICT

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall

    def template_dict(self) -> dict[str, Any]:
        return tool_call_template_dict(self.id, self.function.name, self.function.arguments)


def tool_call_template_dict(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    """A tool call as chat templates read it: arguments as an object when they are a JSON object."""
    try:
        value: Any = json.loads(arguments)
    except json.JSONDecodeError:
        value = arguments
    return {"id": call_id, "type": "function",
            "function": {"name": name, "arguments": value if isinstance(value, dict) else arguments}}


class TextPart(BaseModel):
    """One `{"type": "text", "text": ...}` part of a message's content."""

    model_config = STRICT

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One chat message; content is a string or an array of text parts (None in an assistant
    message that only calls tools)."""

    model_config = STRICT

    role: Annotated[Role, Field(strict=False)]  # the enum from its JSON string
    content: str | list[TextPart] | None = None
    name: str | None = Field(default=None, max_length=256)
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = Field(default=None, max_length=256)
    refusal: str | None = None  # an assistant message sent back as the SDK returned it
    annotations: Unsupported
    audio: Unsupported
    function_call: Unsupported

    @field_validator("content", mode="before")
    @classmethod
    def _content_is_text(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, (str, list)):
            raise PydanticCustomError("string_type", "content must be a string or an array of text parts")
        for part in value if isinstance(value, list) else []:
            if isinstance(part, dict) and part.get("type", "text") != "text":
                raise PydanticCustomError("unsupported_parameter", "content parts of type '{kind}' are not supported",
                                          {"kind": str(part.get("type"))})
        return value

    @model_validator(mode="after")
    def _fields_fit_the_role(self) -> ChatMessage:
        if self.content is None and not (self.role is Role.ASSISTANT and (self.tool_calls or self.refusal)):
            raise PydanticCustomError("value_error",
                                      "content is required unless an assistant message has tool_calls or a refusal")
        if self.tool_calls and self.role is not Role.ASSISTANT:
            raise PydanticCustomError("value_error", "only assistant messages carry tool_calls")
        if self.tool_call_id is not None and self.role is not Role.TOOL:
            raise PydanticCustomError("value_error", "only tool messages carry tool_call_id")
        return self

    def text(self) -> str:
        """The content as one string (text parts joined by newlines; the refusal, or empty, when None)."""
        if self.content is None:
            return self.refusal or ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)

    def template_dict(self) -> dict[str, Any]:
        """The message as the chat template expects it."""
        role = Role.SYSTEM if self.role is Role.DEVELOPER else self.role
        message: dict[str, Any] = {"role": role.value, "content": self.text()}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_calls:
            message["content"] = self.text() if self.content is not None else None
            message["tool_calls"] = [call.template_dict() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class StreamOptions(BaseModel):
    """Options that only apply when `stream` is true."""

    model_config = STRICT

    include_usage: bool = False


class JsonSchemaSpec(BaseModel):
    """`response_format.json_schema`: a named JSON Schema the output must match."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    name: str = Field(pattern=FUNCTION_NAME_PATTERN)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormatType(str, enum.Enum):
    """What the output must be."""

    TEXT = "text"
    JSON_OBJECT = "json_object"  # any JSON object
    JSON_SCHEMA = "json_schema"  # JSON matching `json_schema.schema`


class ResponseFormat(BaseModel):
    """`response_format`: text (the default), any JSON object, or JSON matching a schema."""

    model_config = STRICT

    type: Annotated[ResponseFormatType, Field(strict=False)]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> ResponseFormat:
        if (self.type is ResponseFormatType.JSON_SCHEMA) != (self.json_schema is not None):
            raise PydanticCustomError("value_error", "json_schema is required with type 'json_schema' and only then")
        return self


def _stop_sequences(value: str | list[str] | None) -> str | list[str] | None:
    stops = [value] if isinstance(value, str) else value or []
    if any(not s for s in stops):
        raise PydanticCustomError("value_error", "stop sequences must be non-empty strings")
    return value


StopField = Annotated[
    str | Annotated[list[str], Field(max_length=MAX_STOP_SEQUENCES)] | None,
    AfterValidator(_stop_sequences),
    Field(default=None, description=f"up to {MAX_STOP_SEQUENCES} strings that end generation (not returned)"),
]


class GenerationParams(BaseModel):
    """Parameters shared by chat and text completions (OpenAI's plus a few extras)."""

    model_config = STRICT

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: StopField
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, max_length=256)
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(
        default=None, max_length=16, description="free-form tags; `task` selects the scheduler's task class"
    )
    top_k: int | None = Field(default=None, ge=-1, description="extra: sample from the k most likely tokens")
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0, description="extra")
    min_tokens: int = Field(default=0, ge=0, description="extra: no stop before this many tokens")
    ignore_eos: bool = Field(default=False, description="extra: keep generating past end-of-sequence")
    priority: int = Field(default=0, description="extra: scheduling priority")
    response_format: ResponseFormat | None = None
    logit_bias: Unsupported
    service_tier: Unsupported
    store: Unsupported

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if value is not None and not info.data.get("stream", False):
            raise PydanticCustomError("value_error", "stream_options is only allowed when stream is true")
        return value

    @field_validator("metadata")
    @classmethod
    def _task_name(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value and "task" in value and not re.match(TASK_NAME_PATTERN, value["task"]):
            raise PydanticCustomError("value_error", "metadata.task must match {pattern}",
                                      {"pattern": TASK_NAME_PATTERN})
        return value

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def task(self) -> str | None:
        return (self.metadata or {}).get("task")


class ChatCompletionRequest(GenerationParams):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[ChatTool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True
    functions: Unsupported
    function_call: Unsupported
    audio: Unsupported
    modalities: Unsupported
    prediction: Unsupported
    reasoning_effort: Unsupported
    web_search_options: Unsupported

    @field_validator("tools")
    @classmethod
    def _distinct_names(cls, value: list[ChatTool] | None) -> list[ChatTool] | None:
        names = [tool.function.name for tool in value or []]
        if len(set(names)) != len(names):
            raise PydanticCustomError("value_error", "tools must have distinct function names")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _fits_tools(cls, value: ToolChoice | None, info: ValidationInfo) -> ToolChoice | None:
        check_tool_choice(value, [tool.function.name for tool in info.data.get("tools") or []])
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs", False):
            raise PydanticCustomError("value_error", "top_logprobs requires logprobs to be true")
        return value

    def output_limit(self) -> int | None:
        """max_completion_tokens wins over the deprecated max_tokens."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def num_logprobs(self) -> int | None:
        """Top alternatives per token for the engine, or None when logprobs are off."""
        return (self.top_logprobs or 0) if self.logprobs else None


PromptInput = str | list[str] | Annotated[list[int], Field(min_length=1)] | list[Annotated[list[int], Field(min_length=1)]]


class CompletionRequest(GenerationParams):
    """POST /v1/completions (legacy text completions)."""

    prompt: PromptInput
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: Unsupported
    suffix: Unsupported
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and value != info.data.get("n", 1):
            raise PydanticCustomError("unsupported_parameter", "'best_of' other than n is not supported")
        return value

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value: PromptInput) -> PromptInput:
        if isinstance(value, list) and not value:
            raise PydanticCustomError("value_error", "prompt must not be an empty array")
        return value

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) as a list: each a string or a list of token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and isinstance(self.prompt[0], int):
            return [list(self.prompt)]  # type: ignore[arg-type]
        return list(self.prompt)  # type: ignore[arg-type]
