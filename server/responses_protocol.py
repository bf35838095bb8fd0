"""The Responses API's request body (POST /v1/responses) as pydantic models, and its input
items as chat-template messages. Unknown fields are rejected and parameters this server does
not implement are refused when set, as in `server.protocol`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationInfo, field_validator

from moe_serve.engine.core.guided.spec import GuidedDecoding
from moe_serve.server.protocol import (
    FUNCTION_NAME_PATTERN,
    MAX_TOOLS,
    STRICT,
    FunctionDefinition,
    GenerationParams,
    NamedToolChoice,
    Role,
    Unsupported,
    check_tool_choice,
    tool_call_template_dict,
)

# Output items sent back as input carry fields only the output has (ids, status, annotations).
_LENIENT = ConfigDict(extra="ignore", strict=True)


class InputText(BaseModel):
    """A text part of an input message (`output_text` when an earlier output is sent back)."""

    model_config = _LENIENT

    type: Literal["input_text", "output_text"]
    text: str


class InputMessage(BaseModel):
    """A message item (its `type` may be omitted)."""

    model_config = _LENIENT

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputText]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class FunctionCallItem(BaseModel):
    """A function call the model made earlier (an output item sent back)."""

    model_config = _LENIENT

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(BaseModel):
    """The result of a function call, for the model to read."""

    model_config = _LENIENT

    type: Literal["function_call_output"]
    call_id: str
    output: str


def _item_type(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("type", "message"))
    return str(getattr(value, "type", "message"))


InputItem = Annotated[
    Annotated[InputMessage, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")],
    Discriminator(_item_type, custom_error_type="invalid_input_item",
                  custom_error_message="input items are of type message, function_call or function_call_output"),
]


def _input_kind(value: Any) -> str:
    return "str" if isinstance(value, str) else "list"


# A text or a list of items; the tags are type names, which error locations leave out.
Input = Annotated[Annotated[str, Tag("str")] | Annotated[list[InputItem], Tag("list")], Discriminator(_input_kind)]


def input_messages(items: str | list[Any]) -> list[dict[str, Any]]:
    """Input items as chat-template messages: consecutive function calls join the assistant
    message before them, a call's output is a `tool` message."""
    if isinstance(items, str):
        return [{"role": Role.USER.value, "content": items}]
    messages: list[dict[str, Any]] = []
    for item in items:
        if isinstance(item, InputMessage):
            role = Role.SYSTEM.value if item.role == Role.DEVELOPER.value else item.role
            messages.append({"role": role, "content": item.text()})
        elif isinstance(item, FunctionCallItem):
            call = tool_call_template_dict(item.call_id, item.name, item.arguments)
            if messages and messages[-1]["role"] == Role.ASSISTANT.value:
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": Role.ASSISTANT.value, "content": None, "tool_calls": [call]})
        else:
            messages.append({"role": Role.TOOL.value, "content": item.output, "tool_call_id": item.call_id})
    return messages


class FunctionTool(BaseModel):
    """A function tool (the Responses API's flat form)."""

    model_config = STRICT

    type: Literal["function"]
    name: str = Field(pattern=FUNCTION_NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def definition(self) -> FunctionDefinition:
        return FunctionDefinition(name=self.name, description=self.description, parameters=self.parameters,
                                  strict=self.strict)


class FunctionChoice(BaseModel):
    """tool_choice naming a function."""

    model_config = STRICT

    type: Literal["function"]
    name: str


class TextFormatConfig(BaseModel):
    """`text.format`: text, any JSON object, or JSON matching `schema`."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(default=None, pattern=FUNCTION_NAME_PATTERN)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    @field_validator("schema_")
    @classmethod
    def _schema_for_json_schema(cls, value: dict[str, Any] | None, info: ValidationInfo) -> dict[str, Any] | None:
        if value is not None and info.data.get("type") != "json_schema":
            raise ValueError("schema is only allowed with type 'json_schema'")
        return value

    def guided(self) -> GuidedDecoding | None:
        """The output constraint (None for text); errors name `text.format`."""
        if self.type == "json_object" or (self.type == "json_schema" and self.schema_ is None):
            return GuidedDecoding.json_object(param="text.format")
        if self.type == "json_schema":
            return GuidedDecoding.json_schema(self.schema_, strict=bool(self.strict), param="text.format.schema")
        return None


class TextConfig(BaseModel):
    """`text`: the output's format."""

    model_config = STRICT

    format: TextFormatConfig | None = None
    verbosity: Unsupported


class ResponsesRequest(BaseModel):
    """POST /v1/responses."""

    model_config = STRICT

    model: str
    input: Input
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    text: TextConfig | None = None
    tools: list[FunctionTool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    store: bool = True
    stream: bool = False
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(default=None, max_length=16)
    user: str | None = Field(default=None, max_length=256)
    truncation: Literal["disabled"] | None = None
    include: Unsupported
    reasoning: Unsupported
    background: Unsupported
    conversation: Unsupported
    prompt: Unsupported
    max_tool_calls: Unsupported
    top_logprobs: Unsupported
    service_tier: Unsupported
    stream_options: Unsupported

    @field_validator("tools")
    @classmethod
    def _distinct_names(cls, value: list[FunctionTool] | None) -> list[FunctionTool] | None:
        names = [tool.name for tool in value or []]
        if len(set(names)) != len(names):
            raise ValueError("tools must have distinct function names")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _fits_tools(cls, value: Any, info: ValidationInfo) -> Any:
        names = [tool.name for tool in info.data.get("tools") or []]
        if isinstance(value, FunctionChoice):
            check_tool_choice(_named_choice(value.name), names)
        else:
            check_tool_choice(value, names)
        return value

    def functions(self) -> list[FunctionDefinition]:
        return [tool.definition() for tool in self.tools or []]

    def chat_tool_choice(self) -> Any:
        """tool_choice in the chat API's form."""
        return _named_choice(self.tool_choice.name) if isinstance(self.tool_choice, FunctionChoice) else self.tool_choice

    def guided(self) -> GuidedDecoding | None:
        """The constraint of `text.format` (None for text)."""
        return self.text.format.guided() if self.text is not None and self.text.format is not None else None

    def generation_params(self) -> GenerationParams:
        """The sampling parameters shared with chat completions (ValidationError for a bad metadata.task)."""
        return GenerationParams.model_validate({
            "model": self.model, "max_tokens": self.max_output_tokens, "temperature": self.temperature,
            "top_p": self.top_p, "metadata": self.metadata, "user": self.user,
        })


def _named_choice(name: str) -> NamedToolChoice:
    return NamedToolChoice.model_validate({"type": "function", "function": {"name": name}})
