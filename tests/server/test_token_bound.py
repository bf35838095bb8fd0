"""The byte-length lower bound on token counts: it never exceeds what the tokenizer really
produces (the oracle: encoding the text), for byte-level BPE, SentencePiece-style BPE with byte
fallback and a Unicode-normalizing tokenizer; tokenizers that can drop input get no bound."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from moe_serve.engine.core.request import check_context_length
from moe_serve.engine.errors import ContextLengthExceeded
from moe_serve.engine.model.tokenizer_builder import build_byte_level_tokenizer
from moe_serve.server.context import ServingContext
from moe_serve.server.errors import APIError
from moe_serve.server.token_bound import MAX_CHAR_BYTES, MAX_NORMALIZER_SHRINK, PromptLimit, TokenBound

CORPUS = ["hello world, the quick brown fox " * 4, "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA " * 8, "über café 😀 日本語 " * 4]
TEXTS = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200) | st.sampled_from(
    ["", " " * 300, "A" * 500, "\U0001d400" * 300, "𝐀A" * 100, "\n\n\t" * 50, "ＡＢ" * 90, "😀" * 80])


def _wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def _sentencepiece_like() -> PreTrainedTokenizerFast:
    """BPE with byte fallback over `▁`-joined text (the Llama/Mixtral layout)."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    specials = ["<unk>"] + [f"<0x{i:02X}>" for i in range(256)]
    tokenizer.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=specials))
    return _wrap(tokenizer)


def _nfkc_byte_level() -> PreTrainedTokenizerFast:
    """Byte-level BPE behind NFKC, trained so that long runs of `A` are single tokens: NFKC turns
    each 4-byte `𝐀` into a 1-byte `A`, the worst shrink a normalizer can do."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    return _wrap(tokenizer)


@pytest.fixture(scope="module", params=["byte_level", "sentencepiece_like", "nfkc_byte_level"])
def tokenizer(request: pytest.FixtureRequest) -> Any:
    return {"byte_level": build_byte_level_tokenizer, "sentencepiece_like": _sentencepiece_like,
            "nfkc_byte_level": _nfkc_byte_level}[request.param]()


def test_lossless_tokenizers_get_a_bound_from_their_longest_token(tokenizer: Any) -> None:
    bound = TokenBound.of(tokenizer)
    longest = max(len(token.encode("utf-8")) for token in tokenizer.get_vocab())
    shrink = MAX_NORMALIZER_SHRINK if isinstance(tokenizer.backend_tokenizer.normalizer, normalizers.NFKC) else 1
    assert bound.max_token_bytes == max(longest, MAX_CHAR_BYTES) * shrink


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXTS)
def test_the_bound_never_exceeds_the_real_token_count(tokenizer: Any, text: str) -> None:
    assert TokenBound.of(tokenizer).min_tokens(text) <= len(tokenizer.encode(text, add_special_tokens=False))


def test_the_bound_refuses_megabytes_at_once_for_a_small_context() -> None:
    bound = TokenBound.of(build_byte_level_tokenizer())
    text = "lorem ipsum " * 350_000
    assert bound.min_tokens(text) == -(-len(text) // bound.max_token_bytes) > 200_000


@pytest.mark.parametrize(
    "change",
    [
        lambda t: setattr(t, "pre_tokenizer", pre_tokenizers.Whitespace()),  # drops whitespace
        lambda t: setattr(t, "pre_tokenizer", pre_tokenizers.Split(" ", "removed")),
        lambda t: setattr(t, "normalizer", normalizers.Strip()),
        lambda t: setattr(t, "normalizer", normalizers.Replace("  ", " ")),  # shrinks runs of spaces
        lambda t: setattr(t, "model", models.BPE(unk_token="<unk>", fuse_unk=True)),  # a run of unknowns is one token
        lambda t: setattr(t, "model", models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]")),
    ],
)
def test_tokenizers_that_can_drop_or_fuse_input_get_no_bound(change: Any) -> None:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=False))
    tokenizer.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>"]))
    assert TokenBound.of(_wrap(tokenizer)).max_token_bytes is not None  # unknowns one token per character
    change(tokenizer)
    bound = TokenBound.of(_wrap(tokenizer))
    assert bound.max_token_bytes is None and bound.min_tokens("x" * 10_000) == 0


def test_a_prompt_limit_leaves_room_for_the_requested_output() -> None:
    limit = PromptLimit(max_model_len=100, requested=30, param="messages")
    limit.check(70, exact=True)
    with pytest.raises(APIError) as info:
        limit.check(71, exact=False)
    error = info.value
    assert (error.status_code, error.code, error.param) == (400, "context_length_exceeded", "messages")
    assert "at least 101 tokens (at least 71 in the prompt and 30 in the completion)" in error.message
    PromptLimit(max_model_len=100, requested=None, param="prompt").check(99, exact=True)
    with pytest.raises(APIError):
        PromptLimit(max_model_len=100, requested=None, param="prompt").check(100, exact=True)


def test_one_context_length_rule_for_the_engine_the_prompt_limit_and_the_output_budget() -> None:
    """prompt + requested output (one token when none is requested) must fit; the byte-bound
    check, the server's output budget and the engine all apply `check_context_length`."""
    ctx = ServingContext(engine=SimpleNamespace(max_model_len=20), served_model_name="m", tokenizer=None, bodies=None)
    for num_prompt in range(0, 24):
        for requested in (None, 1, 5, 19, 20, 25):
            fits = num_prompt + (requested or 1) <= 20
            limit = PromptLimit(max_model_len=20, requested=requested, param="prompt")
            if fits:
                assert check_context_length(20, num_prompt, requested) == 20 - num_prompt
                limit.check(num_prompt, exact=True)
                assert ctx.output_budget(num_prompt, requested, "prompt") == (requested or 20 - num_prompt)
                continue
            with pytest.raises(ContextLengthExceeded) as engine_error:
                check_context_length(20, num_prompt, requested)
            exceeded = engine_error.value
            assert (exceeded.max_model_len, exceeded.num_prompt_tokens, exceeded.requested_max_tokens) == (
                20, num_prompt, requested)
            with pytest.raises(APIError) as bound_error:
                limit.check(num_prompt, exact=True)
            with pytest.raises(APIError) as budget_error:
                ctx.output_budget(num_prompt, requested, "prompt")
            for error in (bound_error.value, budget_error.value):
                assert (error.status_code, error.code, error.param, error.message) == (
                    400, "context_length_exceeded", "prompt", str(exceeded))


def test_the_context_length_message_is_openais() -> None:
    assert str(ContextLengthExceeded(32, 40)) == (
        "This model's maximum context length is 32 tokens. However, you requested 40 tokens (40 in the prompt). "
        "Please reduce the length of the prompt or the completion.")
    assert str(ContextLengthExceeded(32, 30, 8, prompt_is_lower_bound=True)) == (
        "This model's maximum context length is 32 tokens. However, you requested at least 38 tokens (at least 30 "
        "in the prompt and 8 in the completion). Please reduce the length of the prompt or the completion.")
