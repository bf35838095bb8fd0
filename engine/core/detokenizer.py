"""Incremental detokenization with stop strings.

Each new token is decoded in a small window (vLLM's prefix/read offsets) instead of
re-decoding the whole output. Text that ends in an incomplete UTF-8 character is held back
until the character completes, and so is a tail that could be the start of a stop string;
a matched stop string ends the request and never reaches the client (unless
include_stop_str_in_output), even when it spans several tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from moe_serve.engine.core.sampling_params import SamplingParams

REPLACEMENT_CHAR = "\ufffd"


@dataclass
class DetokenizerDelta:
    """Text that is safe to emit now, and whether a stop string matched."""

    text: str
    stopped: bool = False


class IncrementalDetokenizer:
    """Decodes one request's output tokens as they arrive."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        skip_special_tokens: bool = True,
    ) -> None:
        """prompt_ids are part of the engine's interface but not read: the output is decoded on
        its own (no prompt context, unlike vLLM), so all deltas plus flush() equal
        tokenizer.decode(output_ids, skip_special_tokens=...)."""
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._stops = [s for s in params.stop if s]
        self._include_stop = params.include_stop_str_in_output
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._decoded = ""  # every complete character decoded so far
        self._emitted = 0  # how much of _decoded went to the client
        self._stopped = False

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return self._decoded[: self._emitted]

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def _advance(self, final: bool) -> None:
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) > len(prefix) and (final or not full.endswith(REPLACEMENT_CHAR)):
            self._decoded += full[len(prefix) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)

    def add_tokens(self, token_ids: Sequence[int]) -> DetokenizerDelta:
        """Add generated tokens; returns the new emittable text (and whether a stop string matched)."""
        if self._stopped:
            return DetokenizerDelta("", True)
        self._ids.extend(token_ids)
        self._advance(final=False)
        return self._emit(final=False)

    def _emit(self, final: bool) -> DetokenizerDelta:
        """Cut at the first stop string; otherwise release all but a possible stop-string start (none when final)."""
        if self._stops:
            search_from = max(0, self._emitted - max(len(s) for s in self._stops) + 1)
            matches = [(i, s) for s in self._stops if (i := self._decoded.find(s, search_from)) >= 0]
            if matches:
                index, stop = min(matches, key=lambda match: (match[0], len(match[1])))  # first to complete
                end = index + len(stop) if self._include_stop else index
                delta = self._decoded[self._emitted : end]
                self._decoded = self._decoded[:end]
                self._emitted = end
                self._stopped = True
                return DetokenizerDelta(delta, True)
        safe_end = len(self._decoded) - (0 if final else self._held_back())
        delta = self._decoded[self._emitted : safe_end]
        self._emitted = max(self._emitted, safe_end)
        return DetokenizerDelta(delta)

    def _held_back(self) -> int:
        """Length of the longest tail of the decoded text that is a proper prefix of a stop string."""
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(self._decoded) - self._emitted), longest, -1):
                if self._decoded.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def flush(self) -> str:
        """At the end (length or eos), return whatever is still held back, still cut at a stop string."""
        if self._stopped:
            return ""
        self._advance(final=True)
        return self._emit(final=True).text
