"""Incremental detokenization: UTF-8 safety and stop strings, against tokenizer.decode."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from moe_serve.engine.core.detokenizer import IncrementalDetokenizer
from moe_serve.engine.core.sampling_params import SamplingParams
from moe_serve.engine.model.tokenizer_builder import build_byte_level_tokenizer

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
    assert out == (decoded[: decoded.find(stop)] if stop in decoded else decoded)
    assert not stopped or stop in decoded


def test_stop_string_completed_at_flush_is_cut(tokenizer) -> None:
    ids = tokenizer.encode("ab\ufffd", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=["\ufffd"]))
    text = "".join(detok.add_tokens([t]).text for t in ids)
    assert text + detok.flush() == "ab" == detok.text


def stream_chunks(tokenizer, ids, params, chunk: int):
    detok = IncrementalDetokenizer(tokenizer, [1, 2], params)
    deltas = []
    for start in range(0, len(ids), chunk):
        d = detok.add_tokens(ids[start : start + chunk])
        deltas.append(d.text)
        if d.stopped:
            assert detok.flush() == "" and detok.add_tokens(ids[:1]).text == ""
            return deltas, True, detok
    deltas.append(detok.flush())
    return deltas, False, detok


@settings(max_examples=80, deadline=None)
@given(data=st.data(), chunk=st.integers(1, 4))
def test_random_token_ids_concatenate_to_decode(tokenizer, data, chunk: int) -> None:
    """Arbitrary ids (specials and partial UTF-8 byte tokens included), fed in chunks."""
    ids = data.draw(st.lists(st.integers(0, len(tokenizer) - 1), min_size=1, max_size=30))
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    deltas, stopped, detok = stream_chunks(tokenizer, ids, SamplingParams(), chunk)
    assert not stopped and "".join(deltas) == decoded == detok.text
    if "\ufffd" not in decoded:
        assert all("\ufffd" not in d for d in deltas)


def first_stop(tokenizer, ids: list[int], stops: list[str], chunk: int) -> tuple[str, int, int] | None:
    """Oracle: generation ends at the first chunk after which the text decoded so far (less a
    trailing incomplete character) contains a stop string; there the earliest-starting match
    (then the shortest) is cut. Returns (that text, match start, match length), or None."""
    for end in range(chunk, len(ids) + chunk, chunk):
        text = tokenizer.decode(ids[:end], skip_special_tokens=True)
        if end < len(ids):
            text = text.rstrip("\ufffd")
        hits = [(text.find(s), len(s)) for s in stops if s in text]
        if hits:
            return (text, *min(hits))
    return None


@settings(max_examples=80, deadline=None)
@given(text=st.text(st.characters(codec="utf-8"), min_size=1, max_size=30),
       stops=st.lists(st.text(min_size=1, max_size=3), min_size=1, max_size=3), include=st.booleans(),
       chunk=st.integers(1, 3))
@example(text="0\u00f90", stops=["\u00f9", "0\u00f90"], include=False, chunk=1)  # the later stop completes first
def test_stop_strings_against_a_string_oracle(tokenizer, text: str, stops: list[str], include: bool, chunk: int) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    params = SamplingParams(stop=stops, include_stop_str_in_output=include)
    deltas, stopped, detok = stream_chunks(tokenizer, ids, params, chunk)
    out = "".join(deltas)
    assert out == detok.text
    cut = first_stop(tokenizer, ids, stops, chunk)
    if cut is None:
        assert not stopped and out == decoded
        return
    assert stopped or decoded.endswith("\ufffd")  # a trailing U+FFFD is only complete at flush()
    text, index, length = cut
    assert out == text[: index + length if include else index]  # a match completed by flush() is cut too
    assert all("\ufffd" not in d for d in deltas) or "\ufffd" in decoded


def test_multi_byte_characters_split_across_tokens_are_held_back(tokenizer) -> None:
    text = "🧑‍💻🇫🇷"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > 2
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams())
    deltas = [detok.add_tokens([t]).text for t in ids]
    assert "".join(deltas) + detok.flush() == text
    assert all("\ufffd" not in d for d in deltas) and "" in deltas


def test_special_tokens_are_skipped_or_kept(tokenizer) -> None:
    ids = tokenizer.encode("hi", add_special_tokens=False) + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    for skip in (True, False):
        detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(), skip_special_tokens=skip)
        text = "".join(detok.add_tokens([t]).text for t in ids) + detok.flush()
        assert text == tokenizer.decode(ids, skip_special_tokens=skip)
