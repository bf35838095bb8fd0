"""Incremental detokenization: UTF-8 safety and stop strings, against tokenizer.decode."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.detokenizer import IncrementalDetokenizer
from engine.sampling_params import SamplingParams
from engine.tokenizer_builder import build_byte_level_tokenizer

TEXTS = ["Hello wörld! 你好，世界 🎉🚀 naïve café", "def f(x):\n    return x * 2  # ✓", "日本語のテキスト😀😃😄"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_byte_level_tokenizer()


def stream(tokenizer, ids, params):
    detok = IncrementalDetokenizer(tokenizer, [], params)
    deltas, stopped = [], False
    for t in ids:
        d = detok.add_tokens([t])
        deltas.append(d.text)
        if d.stopped:
            stopped = True
            break
    if not stopped:
        deltas.append(detok.flush())
    return deltas, stopped


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_decode_and_never_split_characters(tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    deltas, _ = stream(tokenizer, ids, SamplingParams())
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert all("\ufffd" not in d for d in deltas)


def test_stop_string_spanning_tokens_is_cut_and_never_emitted(tokenizer) -> None:
    ids = tokenizer.encode("alpha beta STOP gamma", add_special_tokens=False)
    deltas, stopped = stream(tokenizer, ids, SamplingParams(stop=["STOP"]))
    assert stopped and "".join(deltas) == "alpha beta "


def test_stop_string_at_the_very_beginning_and_include_option(tokenizer) -> None:
    ids = tokenizer.encode("END of it", add_special_tokens=False)
    deltas, stopped = stream(tokenizer, ids, SamplingParams(stop=["END"]))
    assert stopped and "".join(deltas) == ""
    deltas, stopped = stream(tokenizer, tokenizer.encode("a b END c", add_special_tokens=False),
                             SamplingParams(stop=["END"], include_stop_str_in_output=True))
    assert stopped and "".join(deltas) == "a b END"


def test_held_back_prefix_is_released_when_it_does_not_become_a_stop(tokenizer) -> None:
    ids = tokenizer.encode("x ST y", add_special_tokens=False)
    deltas, stopped = stream(tokenizer, ids, SamplingParams(stop=["STOP"]))
    assert not stopped and "".join(deltas) == "x ST y"


@settings(max_examples=60, deadline=None)
@given(text=st.text(min_size=1, max_size=40), stop=st.text(min_size=1, max_size=4))
def test_random_text_and_stop_strings(tokenizer, text: str, stop: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    deltas, stopped = stream(tokenizer, ids, SamplingParams(stop=[stop]))
    out = "".join(deltas)
    assert stop not in out
    if stopped:
        assert decoded.startswith(out) and stop in decoded
        assert decoded.find(stop) == len(out)
    else:
        assert out == decoded
