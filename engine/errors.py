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


class ContextLengthExceededError(InvalidRequestError):
    """Prompt (plus requested output) does not fit the model's context (maps to 400)."""

    code = "context_length_exceeded"


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
