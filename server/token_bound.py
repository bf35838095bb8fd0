"""The fewest tokens a text can become, known from its byte length alone (`TokenBound`), and
how many a prompt may have (`PromptLimit`).

With a tokenizer that keeps every input byte (byte-level BPE, or BPE and Unigram with byte
fallback), each token covers at most the bytes of the longest vocabulary entry, so a text of
B bytes is at least B / max_token_bytes tokens. Vocabulary entries are measured as stored:
byte-level and `▁` spellings take as many bytes as the input they stand for, or more, which
keeps the bound on the safe side. Unicode normalizers (NFC, NFKC, lowercase, ...) can shrink a
character to a quarter of its bytes at most (4 bytes of UTF-8 to 1), so they divide the bound
by 4. A tokenizer that can drop or fuse input (whitespace-removing pre-tokenizers, fused
unknown tokens, WordPiece, other normalizers) gets no bound: its prompts are always tokenized.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from moe_serve.engine.core.request import check_context_length
from moe_serve.engine.errors import ContextLengthExceeded
from moe_serve.server.errors import from_engine_error

# The most UTF-8 bytes of one character: an unknown character that becomes one token covers this.
MAX_CHAR_BYTES = 4
# The most a Unicode normalizer divides a text's byte length by (one 4-byte character to 1 byte).
MAX_NORMALIZER_SHRINK = 4
_UNICODE_NORMALIZERS = frozenset({"NFC", "NFD", "NFKC", "NFKD", "Lowercase"})
_KEEPING_PRE_TOKENIZERS = frozenset({"ByteLevel", "Metaspace", "Digits", "UnicodeScripts"})
_SPLITTING_PRE_TOKENIZERS = frozenset({"Split", "Punctuation"})  # keep input unless behavior is Removed


def _component(obj: Any) -> dict[str, Any] | None:
    """The JSON description of a tokenizers normalizer or pre-tokenizer (None when absent)."""
    return None if obj is None else json.loads(obj.__getstate__())


def normalizer_shrink(spec: dict[str, Any] | None) -> int | None:
    """How many times a normalizer can shrink a text's bytes at most (None: no limit known)."""
    if spec is None:
        return 1
    kind = spec.get("type")
    if kind == "Sequence":
        factors = [normalizer_shrink(part) for part in spec.get("normalizers", [])]
        if any(factor is None for factor in factors):
            return None
        return MAX_NORMALIZER_SHRINK if any(factor != 1 for factor in factors) else 1
    if kind in _UNICODE_NORMALIZERS:
        return MAX_NORMALIZER_SHRINK
    if kind == "Prepend":
        return 1
    if kind == "Replace":
        pattern = spec.get("pattern", {}).get("String")
        content = spec.get("content", "")
        if pattern and len(content.encode("utf-8")) >= len(pattern.encode("utf-8")):
            return 1
    return None


def pre_tokenizer_keeps_input(spec: dict[str, Any] | None) -> bool:
    """Whether a pre-tokenizer only splits (never removes) its input."""
    if spec is None:
        return True
    kind = spec.get("type")
    if kind == "Sequence":
        return all(pre_tokenizer_keeps_input(part) for part in spec.get("pretokenizers", []))
    if kind in _SPLITTING_PRE_TOKENIZERS:
        return spec.get("behavior") != "Removed"
    return kind in _KEEPING_PRE_TOKENIZERS


def _is_byte_level(spec: dict[str, Any] | None) -> bool:
    if spec is None:
        return False
    if spec.get("type") == "Sequence":
        return any(_is_byte_level(part) for part in spec.get("pretokenizers", []))
    return spec.get("type") == "ByteLevel"


def model_keeps_input(model: Any, byte_level: bool) -> bool:
    """Whether the tokenization model turns every piece of input into tokens, never dropping it
    (an unknown character without an unknown token) nor folding a run of it into one token."""
    kind = type(model).__name__
    if kind == "BPE":
        return byte_level or bool(model.byte_fallback) or (model.unk_token is not None and not model.fuse_unk)
    if kind == "Unigram":
        return bool(getattr(model, "byte_fallback", False))
    return False


@dataclass(frozen=True)
class PromptLimit:
    """How long a prompt in the field `param` may be: the engine's context-length rule
    (`check_context_length`) applied before the prompt is tokenized or parsed."""

    max_model_len: int
    requested: int | None
    param: str

    def check(self, min_prompt_tokens: int, exact: bool) -> None:
        """400 context_length_exceeded when a prompt of (at least) this many tokens cannot fit."""
        try:
            check_context_length(self.max_model_len, min_prompt_tokens, self.requested,
                                 prompt_is_lower_bound=not exact)
        except ContextLengthExceeded as exc:
            raise from_engine_error(exc, self.param) from exc


@dataclass(frozen=True)
class TokenBound:
    """`min_tokens(text)`: a lower bound on the tokens `text` encodes to (0 when none is known)."""

    max_token_bytes: int | None

    @classmethod
    def of(cls, tokenizer: Any) -> TokenBound:
        """The bound of a Hugging Face fast tokenizer (none for any other kind)."""
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            return cls(None)
        pre_tokenizer = _component(backend.pre_tokenizer)
        shrink = normalizer_shrink(_component(backend.normalizer))
        if (shrink is None or not pre_tokenizer_keeps_input(pre_tokenizer)
                or not model_keeps_input(backend.model, _is_byte_level(pre_tokenizer))):
            return cls(None)
        longest = max((len(token.encode("utf-8", "surrogatepass")) for token in tokenizer.get_vocab()), default=0)
        return cls(max(longest, MAX_CHAR_BYTES) * shrink)

    def min_tokens(self, text: str) -> int:
        if self.max_token_bytes is None:
            return 0
        num_bytes = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
        return math.ceil(num_bytes / self.max_token_bytes)
