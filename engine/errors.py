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
    """The waiting queue is full (maps to 429 with Retry-After)."""

    code = "queue_full"

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineDeadError(EngineError):
    """The engine loop has stopped (maps to 503)."""

    code = "engine_dead"


class ModelLoadError(EngineError):
    """A checkpoint cannot be loaded: missing, corrupt or unsupported."""

    code = "model_load_error"
