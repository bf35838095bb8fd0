"""Sampling parameters of a request, and the small value types of its outputs. No torch import."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from moe_serve.engine.core.guided.spec import GuidedDecoding
from moe_serve.engine.errors import InvalidParameter

MAX_TOP_LOGPROBS = 20
MIN_SEED = -(2**63)  # the range torch.Generator.manual_seed accepts
MAX_SEED = 2**64
# Below this temperature a request is decoded greedily: dividing float32 logits by a smaller one
# overflows (1e-45 is a float32 subnormal, 1e-300 rounds to 0), and the result would be argmax anyway.
MIN_TEMPERATURE = 1e-5
# The repetition penalty is clamped to this range before it divides or multiplies float32 logits,
# so a penalised logit stays finite (1e-45 would turn every repeated positive logit into inf).
MIN_REPETITION_PENALTY = 1e-3
MAX_REPETITION_PENALTY = 1e3


class FinishReason(str, enum.Enum):
    """Why a request stopped (the OpenAI names)."""

    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


@dataclass
class TokenLogprob:
    """A sampled token's log-probability and the top alternatives (token id, logprob), best first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop (OpenAI semantics, plus vLLM-style extras).

    logprobs: None for none; k >= 0 returns the sampled token's logprob and the top-k
    alternatives. Logprobs are those of the model (log_softmax of the raw logits, before
    penalties and temperature), like OpenAI's. A temperature below MIN_TEMPERATURE is greedy;
    the repetition penalty is applied clamped to [MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY].
    skip_special_tokens: special tokens are left out of the output text (the server keeps them
    when a tool-call format marks its calls with special tokens).
    guided: the output must match this grammar (the engine compiles it when the request is added;
    a spec it cannot compile is a GuidedCompileError naming the spec's `param`).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    guided: GuidedDecoding | None = None

    @property
    def is_greedy(self) -> bool:
        """Temperature 0 (or below MIN_TEMPERATURE) means argmax decoding."""
        return self.temperature < MIN_TEMPERATURE

    @property
    def applied_repetition_penalty(self) -> float:
        """The repetition penalty the sampler applies: clamped so penalised logits stay finite."""
        return min(max(self.repetition_penalty, MIN_REPETITION_PENALTY), MAX_REPETITION_PENALTY)

    def validate(self) -> None:
        """Raise InvalidParameter (a ValueError) naming the first field outside its allowed range;
        the fields are named as in the OpenAI API."""
        if self.top_k == -1:
            self.top_k = 0
        checks = [
            (self.max_tokens >= 1, "max_tokens", "must be >= 1", self.max_tokens),
            (0.0 <= self.temperature <= 2.0, "temperature", "must be in [0, 2]", self.temperature),
            (0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]", self.top_p),
            (self.top_k >= 0, "top_k", "must be >= 0 (0 or -1 disables it)", self.top_k),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be in [-2, 2]", self.presence_penalty),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "must be in [-2, 2]", self.frequency_penalty),
            (self.repetition_penalty > 0.0, "repetition_penalty", "must be > 0", self.repetition_penalty),
            (0 <= self.min_tokens <= self.max_tokens, "min_tokens", "must be in [0, max_tokens]", self.min_tokens),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_TOP_LOGPROBS, "logprobs",
             f"must be in [0, {MAX_TOP_LOGPROBS}]", self.logprobs),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings", self.stop),
            (all(t >= 0 for t in self.stop_token_ids), "stop_token_ids", "must be >= 0", self.stop_token_ids),
            (self.seed is None or MIN_SEED <= self.seed < MAX_SEED, "seed", "must be in [-2**63, 2**64)", self.seed),
        ]
        for ok, name, rule, value in checks:
            if not ok:
                raise InvalidParameter(name, f"{name} {rule}, got {value!r}")
        if self.guided is not None:
            self.guided.validate()
