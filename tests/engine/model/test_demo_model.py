"""The bundled demo model and the byte-level tokenizer builder: determinism, loading, reuse, chat template."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import transformers

from moe_serve.engine.model import demo_model
from moe_serve.engine.model.demo_model import DEMO_MODEL_NAME, default_cache_dir, ensure_demo_model
from moe_serve.engine.model.tokenizer_builder import build_byte_level_tokenizer, save_tokenizer

ROUND_TRIP_TEXTS = (
    "plain ASCII, with punctuation: (a + b) * c!",
    "  leading spaces, trailing tabs\t\t\nand newlines\n\n",
    "accents: café naïve façade Ærøskøbing",
    "CJK: 你好，世界 こんにちは 안녕하세요",
    "emoji: 😀🎉🚀 👍🏽 🧑‍💻 🇫🇷 ❤️",
    "rare: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u0000 \u200b ﷽ 🦜",
)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_demo_model(tmp_path_factory.mktemp("demo-cache"))


def test_demo_model_lands_in_versioned_dir(demo_dir: Path) -> None:
    assert demo_dir.name == f"{DEMO_MODEL_NAME}-v1"
    assert demo_model.is_complete(demo_dir)
    assert [p.name for p in demo_dir.parent.iterdir()] == [demo_dir.name]


def test_two_builds_are_identical(demo_dir: Path, tmp_path: Path) -> None:
    other = ensure_demo_model(tmp_path)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "generation_config.json"):
        assert (other / name).read_bytes() == (demo_dir / name).read_bytes(), name


def test_tokenizer_build_is_deterministic(tmp_path: Path) -> None:
    first, second = build_byte_level_tokenizer(), build_byte_level_tokenizer()
    save_tokenizer(first, tmp_path / "a")
    save_tokenizer(second, tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    assert len(first) == 512


def test_tokenizer_rejects_a_vocab_below_the_byte_alphabet() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        build_byte_level_tokenizer(vocab_size=100)


def test_config_and_tokenizer_load_and_agree(demo_dir: Path) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(demo_dir)
    config = transformers.AutoConfig.from_pretrained(demo_dir)
    generation = transformers.GenerationConfig.from_pretrained(demo_dir)
    assert config.model_type == "mixtral"
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (64, 128, 4)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert (config.num_local_experts, config.num_experts_per_tok) == (8, 2)
    assert config.max_position_embeddings == 2048 and config.sliding_window is None
    assert config.vocab_size == len(tokenizer)
    assert tokenizer.eos_token == "<|im_end|>"
    assert {"<s>", "</s>", "<unk>", "<pad>", "<|im_start|>", "<|im_end|>"} <= set(tokenizer.all_special_tokens)
    eos_ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("</s>")]
    for cfg in (config, generation):
        assert cfg.bos_token_id == tokenizer.bos_token_id
        assert cfg.eos_token_id == eos_ids
        assert cfg.pad_token_id == tokenizer.pad_token_id


def test_chat_template_renders_chatml(demo_dir: Path) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(demo_dir)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi 😀"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": [{"type": "text", "text": "Again"}]},
    ]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi 😀<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nAgain<|im_end|>\n<|im_start|>assistant\n"
    )
    without = tokenizer.apply_chat_template(messages[:2], add_generation_prompt=False, tokenize=False)
    assert not without.endswith("<|im_start|>assistant\n")
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 5
    assert ids.count(tokenizer.eos_token_id) == 4


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_utf8_round_trip(demo_dir: Path, text: str) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(demo_dir)
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert all(0 <= i < len(tokenizer) for i in ids)
    assert tokenizer.decode(ids) == text


def test_transformers_loads_the_model_with_finite_logits(demo_dir: Path) -> None:
    model = transformers.MixtralForCausalLM.from_pretrained(demo_dir, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(demo_dir)
    ids = torch.tensor([tokenizer.encode("Hello, world! 你好 🚀", add_special_tokens=False)])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()


def test_reuse_does_not_rebuild(demo_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                caplog: pytest.LogCaptureFixture) -> None:
    before = (demo_dir / "model.safetensors").stat()

    def fail(directory: Path) -> None:
        raise AssertionError("rebuilt a complete demo model")

    monkeypatch.setattr(demo_model, "write_demo_model", fail)
    with caplog.at_level(logging.WARNING, logger="moe_serve.engine.model.demo_model"):
        assert ensure_demo_model(demo_dir.parent) == demo_dir
    after = (demo_dir / "model.safetensors").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert "random" in caplog.text.lower() and "gibberish" in caplog.text


def _write_placeholder_files(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name in demo_model.REQUIRED_FILES:
        (directory / name).write_text(directory.name)


def test_incomplete_build_is_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = demo_model.demo_model_dir(tmp_path)
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    monkeypatch.setattr(demo_model, "write_demo_model", _write_placeholder_files)
    assert ensure_demo_model(tmp_path) == target
    assert demo_model.is_complete(target)
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_losing_a_concurrent_build_race_uses_the_winner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = demo_model.demo_model_dir(tmp_path)

    def build_while_another_process_finishes(directory: Path) -> None:
        _write_placeholder_files(target)
        _write_placeholder_files(directory)

    monkeypatch.setattr(demo_model, "write_demo_model", build_while_another_process_finishes)
    assert ensure_demo_model(tmp_path) == target
    assert (target / "config.json").read_text() == target.name
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_default_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MOE_SERVE_CACHE_DIR", str(tmp_path / "explicit"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("MOE_SERVE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "moe-serve"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "moe-serve"
