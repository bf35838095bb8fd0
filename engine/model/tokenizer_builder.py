"""Builds the small byte-level BPE tokenizer (with a ChatML chat template) used by the demo model and tests.

The tokenizer is trained at call time on a corpus written in this module, so nothing is downloaded.
Training is deterministic: two builds give byte-identical tokenizer.json files.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
PAD_TOKEN = "<pad>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
SPECIAL_TOKENS: tuple[str, ...] = (BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, PAD_TOKEN, IM_START_TOKEN, IM_END_TOKEN)
MODEL_MAX_LENGTH = 2048

CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- elif message['content'] is not none -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

BUILTIN_CORPUS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.",
    "Mixture-of-Experts models route each token to a few experts, so only part of the network runs per token.",
    "When the GPU cannot hold every expert, the missing ones are copied from host memory before they are needed.",
    "Hello! How are you today? I am fine, thank you. What would you like to talk about this morning?",
    "The weather is sunny with a light breeze; tomorrow it will rain in the evening and clear up at night.",
    "Please summarize the following article in three sentences and list the main points as bullet items.",
    "Once upon a time, there was a little robot who wanted to learn how to write poems about the sea.",
    "User: What is the capital of France?\nAssistant: The capital of France is Paris.",
    "System: You are a helpful assistant. Answer briefly and honestly, and say when you do not know.",
    "In 2024, the team measured 1,234 requests per second with a p99 latency of 87.5 ms on one machine.",
    "def fibonacci(n: int) -> int:\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "for i in range(10):\n    print(f\"{i}: {i * i}\")\n",
    "import torch\n\nx = torch.randn(4, 8)\ny = x @ x.T\nprint(y.shape)\n",
    "class Cache:\n    def __init__(self, capacity: int) -> None:\n        self.capacity = capacity\n        self.items = {}\n",
    "#include <stdio.h>\nint main(void) {\n    printf(\"hello, world\\n\");\n    return 0;\n}\n",
    "function add(a, b) {\n  return a + b;\n}\nconsole.log(add(2, 3));\n",
    "SELECT name, COUNT(*) FROM users WHERE active = 1 GROUP BY name ORDER BY name;",
    '{"model": "demo", "messages": [{"role": "user", "content": "hi"}], "stream": true}',
    "<html><body><p>Hello &amp; welcome</p></body></html>",
    "Le café est très bon, mais la crème brûlée est encore meilleure. Où est la bibliothèque ?",
    "Ich möchte gern ein Stück Käsekuchen und eine große Tasse Kaffee, bitte. Schöne Grüße!",
    "¿Dónde está la estación? La niña comió una piña en el año pasado. ¡Qué día tan bonito!",
    "Olá, tudo bem? A canção é muito bonita e a informação está correta. Obrigação cumprida.",
    "Привет, как дела? Я люблю читать книги и гулять в парке по вечерам.",
    "Γειά σου κόσμε. Η γλώσσα είναι όμορφη και η θάλασσα είναι γαλάζια.",
    "你好，世界！今天天气很好，我们去公园散步吧。机器学习模型需要大量的数据。",
    "こんにちは、世界。今日はいい天気ですね。ラーメンとお寿司が好きです。",
    "안녕하세요, 세계. 오늘 날씨가 정말 좋네요. 한국어를 배우고 있어요.",
    "مرحبا بالعالم. كيف حالك اليوم؟",
    "नमस्ते दुनिया। आप कैसे हैं?",
    "Emoji test: 😀 😂 🎉 🚀 ❤️ 👍🏽 🧑‍💻 🇫🇷 — done ✅. Math: ∑ ∫ √ π ≈ 3.14159, ∞ ≠ 0, α β γ δ.",
    "Prices: €10, £8, ¥1000, ₹500. Quotes: “double” and ‘single’… naïve façade coöperate résumé.",
)


def build_byte_level_tokenizer(vocab_size: int = 512, corpus: Iterable[str] | None = None) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of `vocab_size` tokens (specials included) on `corpus` or the built-in one.

    Every UTF-8 string round-trips through encode/decode because all 256 bytes are in the vocabulary.
    """
    min_vocab = 256 + len(SPECIAL_TOKENS)
    if vocab_size < min_vocab:
        raise ValueError(f"vocab_size={vocab_size} is below the {min_vocab} tokens of the byte alphabet and specials")
    texts = list(BUILTIN_CORPUS if corpus is None else corpus)
    backend = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(texts, trainer=trainer, length=len(texts))
    logger.debug("trained a byte-level BPE of %d tokens on %d texts", backend.get_vocab_size(), len(texts))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=IM_END_TOKEN,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[IM_START_TOKEN, EOS_TOKEN],
        chat_template=CHATML_TEMPLATE,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: Path) -> None:
    """Write `tokenizer` (chat template included) so that AutoTokenizer.from_pretrained(directory) loads it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(directory))
