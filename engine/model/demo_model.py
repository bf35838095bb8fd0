"""The bundled demo model: a tiny random-weight Mixtral checkpoint built locally on first use.

It lets the server start with no download and no model argument. The weights are random, so the
text it produces is gibberish; it exists to exercise the serving and expert-offload paths.
The build is deterministic and lands in the cache directory with one atomic rename, so two
processes building at once are safe and a complete build is reused.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from moe_serve.engine.model.tokenizer_builder import EOS_TOKEN, build_byte_level_tokenizer, save_tokenizer

logger = logging.getLogger(__name__)

DEMO_MODEL_NAME = "moe-serve-demo-mixtral"
DEMO_MODEL_VERSION = 1
DEMO_SEED = 0
DEMO_VOCAB_SIZE = 512
CACHE_DIR_ENV = "MOE_SERVE_CACHE_DIR"
REQUIRED_FILES: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)


def default_cache_dir() -> Path:
    """$MOE_SERVE_CACHE_DIR, else $XDG_CACHE_HOME/moe-serve, else ~/.cache/moe-serve."""
    explicit = os.environ.get(CACHE_DIR_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "moe-serve"


def demo_model_dir(cache_dir: Path | None = None) -> Path:
    """Where the demo checkpoint lives (or will live) under `cache_dir`."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / f"{DEMO_MODEL_NAME}-v{DEMO_MODEL_VERSION}"


def is_complete(directory: Path) -> bool:
    """True when `directory` holds every file of a finished demo build."""
    return all((directory / name).is_file() for name in REQUIRED_FILES)


def ensure_demo_model(cache_dir: Path | None = None) -> Path:
    """Return the demo checkpoint directory, building it first if no complete build exists."""
    target = demo_model_dir(cache_dir)
    if is_complete(target):
        logger.debug("reusing the demo model at %s", target)
    else:
        _build_atomically(target)
    logger.warning(
        "Serving the bundled demo model '%s' (%s): its weights are RANDOM, so it produces gibberish. "
        "It exists to try the server; pass a real Mixture-of-Experts checkpoint for meaningful text.",
        DEMO_MODEL_NAME, target,
    )
    return target


def write_demo_model(directory: Path) -> None:
    """Write the demo checkpoint (weights, config, generation config, tokenizer) into `directory`."""
    import transformers

    tokenizer = build_byte_level_tokenizer(DEMO_VOCAB_SIZE)
    eos_token_ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(EOS_TOKEN)]
    config = transformers.MixtralConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=2048,
        sliding_window=None,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_token_ids,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(DEMO_SEED)
    model = transformers.MixtralForCausalLM(config).to(torch.float32).eval()
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_token_ids,
        pad_token_id=tokenizer.pad_token_id,
    )
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    save_tokenizer(tokenizer, directory)


def _build_atomically(target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        _discard_incomplete(target)
    logger.info("building the demo model into %s (first use)", target)
    start = time.perf_counter()
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
    try:
        write_demo_model(staging)
        try:
            staging.rename(target)
        except OSError:
            if not is_complete(target):
                raise
            logger.info("another process finished the demo model first; using its build")
            return
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("built the demo model in %.1f s", time.perf_counter() - start)


def _discard_incomplete(target: Path) -> None:
    logger.warning("removing the incomplete demo model directory %s", target)
    trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.discard-", dir=target.parent))
    try:
        target.rename(trash / target.name)
    except FileNotFoundError:
        logger.debug("the incomplete directory %s was already removed", target)
    finally:
        shutil.rmtree(trash, ignore_errors=True)
