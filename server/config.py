"""ServeConfig: engine settings plus HTTP settings, layered YAML profile -> environment -> flags.

A YAML profile (configs/*.yaml) gives defaults, `MOE_SERVE_<FIELD>` environment variables
override it, command-line flags override both. pydantic validates the merged result and a
bad value becomes one line naming the field and what is allowed.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, ValidationInfo, field_validator

from moe_serve.engine.config import EngineConfig

ENV_PREFIX = "MOE_SERVE_"
DEFAULT_MAX_REQUEST_BYTES = 4 * 2**20
DEFAULT_REQUEST_TIMEOUT_S = 30.0


class ConfigError(Exception):
    """A configuration that cannot be used; the message is one line for the user."""


class LogLevel(str, enum.Enum):
    """Logging verbosity."""

    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class ServeConfig(EngineConfig):
    """Everything `moe-serve serve` needs."""

    host: str = Field(default="127.0.0.1", description="address to bind")
    port: int = Field(default=8000, ge=1, le=65535)
    api_key: str | None = Field(default=None, description="require this Bearer key on /v1 routes")
    auth_health_and_metrics: bool = Field(default=False,
                                          description="require the API key on /health, /metrics and /dashboard too")
    log_level: LogLevel = LogLevel.INFO
    shutdown_timeout_s: float = Field(default=30.0, ge=0, description="grace period for running requests on SIGTERM")
    max_request_bytes: int = Field(default=DEFAULT_MAX_REQUEST_BYTES, ge=1024,
                                   description="largest request body; larger ones get 413")
    request_timeout_s: float = Field(default=DEFAULT_REQUEST_TIMEOUT_S, gt=0,
                                     description="seconds a client has to send its whole request body (then 408)")
    allowed_hosts: list[str] | None = Field(
        default=None, description="comma-separated Host names the server answers (e.g. localhost,127.0.0.1; "
                                  "*.example.com, * for any); others get 400. Unset: any host")
    docs: bool = Field(default=False, description="serve the interactive API page at /docs")

    @field_validator("auth_health_and_metrics")
    @classmethod
    def _needs_a_key(cls, value: bool, info: ValidationInfo) -> bool:
        if value and not info.data.get("api_key"):
            raise ValueError("requires api_key to be set")
        return value

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: Any) -> Any:
        """Flags and environment variables give one comma-separated string; no host at all is unset."""
        if isinstance(value, str):
            value = [host.strip() for host in value.split(",") if host.strip()]
        return value or None


def _read_profile(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping of field: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _from_env(fields: set[str], environ: Mapping[str, str]) -> dict[str, Any]:
    return {
        name: environ[ENV_PREFIX + name.upper()]
        for name in fields
        if ENV_PREFIX + name.upper() in environ
    }


def describe_validation_error(exc: ValidationError, sources: Mapping[str, str]) -> str:
    """One line per problem: the field, where its value came from, what is allowed."""
    parts = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "config"
        origin = sources.get(str(err["loc"][0]) if err["loc"] else "", "")
        where = f" (from {origin})" if origin else ""
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown setting {field!r}{where}")
        else:
            parts.append(f"{field}{where}: {err['msg']} (got {err.get('input')!r})")
    return "invalid configuration: " + "; ".join(parts)


def load_config(
    cls: type[EngineConfig],
    profile: Path | None,
    flags: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
) -> Any:
    """Merge profile, environment and flags (later wins) and validate them as `cls`."""
    environ = os.environ if environ is None else environ
    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    layers = [
        (_read_profile(profile) if profile else {}, str(profile)),
        (_from_env(set(cls.model_fields), environ), "environment"),
        ({k: v for k, v in flags.items() if v is not None}, "command line"),
    ]
    for values, origin in layers:
        merged.update(values)
        sources.update({k: origin for k in values})
    try:
        return cls.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, sources)) from exc
