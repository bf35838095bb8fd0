"""Errors the engine raises at its boundary; the server maps each to an HTTP status."""

from __future__ import annotations


class EngineError(Exception):
    """Base class: `code` is a short machine-readable string, the message is for humans."""

    code: str = "engine_error"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class InvalidRequestError(EngineError):
    """The request can never be served as given (maps to 400)."""

    code = "invalid_request"


class InvalidParameter(InvalidRequestError, ValueError):
    """A request field is outside its allowed range (maps to 400 with `param`): `param` is the
    API field's name (`temperature`, `max_tokens`, `stop`, ...)."""

    code = "invalid_value"

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param

    def __reduce__(self) -> tuple[type[InvalidParameter], tuple[str, str]]:
        return type(self), (self.param, str(self))


class ContextLengthExceededError(InvalidRequestError):
    """Prompt (plus requested output) does not fit the model's context (maps to 400)."""

    code = "context_length_exceeded"


class ContextLengthExceeded(ContextLengthExceededError):
    """The prompt's `num_prompt_tokens` plus `requested_max_tokens` (one token when None) exceed
    `max_model_len`, in OpenAI's wording; `prompt_is_lower_bound`: the prompt was not tokenized,
    its count is the fewest tokens it can be."""

    def __init__(self, max_model_len: int, num_prompt_tokens: int, requested_max_tokens: int | None = None,
                 prompt_is_lower_bound: bool = False) -> None:
        wanted = f" and {requested_max_tokens} in the completion" if requested_max_tokens is not None else ""
        qualifier = "at least " if prompt_is_lower_bound else ""
        total = num_prompt_tokens + (requested_max_tokens or 0)
        super().__init__(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{qualifier}{total} tokens ({qualifier}{num_prompt_tokens} in the prompt{wanted}). "
            "Please reduce the length of the prompt or the completion."
        )
        self.max_model_len = max_model_len
        self.num_prompt_tokens = num_prompt_tokens
        self.requested_max_tokens = requested_max_tokens
        self.prompt_is_lower_bound = prompt_is_lower_bound

    def __reduce__(self) -> tuple[type[ContextLengthExceeded], tuple[int, int, int | None, bool]]:
        return type(self), (self.max_model_len, self.num_prompt_tokens, self.requested_max_tokens,
                            self.prompt_is_lower_bound)


class QueueFullError(EngineError):
    """The waiting queue is full (maps to 429 with Retry-After): `retry_after_s` is the expected
    wait of a request arriving now (`EngineStats.expected_wait_s`)."""

    code = "queue_full"

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineStepError(EngineError):
    """A step this request was in failed (an exception in the model, or non-finite logits for
    its row); the request ends, the engine goes on (maps to 500)."""

    code = "engine_step_failed"


class EngineFatalError(EngineError):
    """A fault that leaves the engine unusable (a device error, or steps that keep failing);
    the engine stops and the server exits non-zero."""

    code = "engine_fatal"


class EngineDeadError(EngineError):
    """The engine loop has stopped (maps to 503)."""

    code = "engine_dead"


class ModelLoadError(EngineError):
    """A checkpoint cannot be loaded: missing, corrupt or unsupported."""

    code = "model_load_error"
