"""Per-token cost of grammar-constrained decoding on a CPU.

`engine`: decode step time (= per-token time) of the engine at batch 1 and 16, every row
constrained by a JSON Schema vs the same requests unconstrained, in the same run: two engines on
one checkpoint step in turns (A B B A A B ..., so both see the same machine load), and each pair
of steps in which both decoded all `batch` rows gives a ratio; a round is one generation, its
overhead the median ratio, and the figure the median over rounds. Run with torch's default
threads and with one (`--threads 0 1`).
`libraries`: the mask cost per token of llguidance, xgrammar and outlines-core (each one that is
installed) along one fixed JSON document of the same schema, alternating libraries per round.

Both use a byte-level BPE of `--vocab` tokens trained on the Python standard library's sources
(local, deterministic; realistic models have 32k-150k tokens, the masks' cost grows with it) and,
for `engine`, a random Mixtral-style checkpoint with that vocabulary.

    python -m benchmarks.structured_decode engine [--vocab 32000] [--batches 1 16] [--rounds 3] [--threads 0 1]
    python -m benchmarks.structured_decode libraries [--vocab 32000] [--rounds 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers

from moe_serve.engine.builder import build_engine
from moe_serve.engine.config import EngineConfig
from moe_serve.engine.core.guided.spec import GuidedDecoding
from moe_serve.engine.core.llm_engine import LLMEngine
from moe_serve.engine.core.request import EngineRequest
from moe_serve.engine.core.sampling_params import SamplingParams
from moe_serve.engine.model.tokenizer_builder import build_byte_level_tokenizer, save_tokenizer

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"}, "age": {"type": "integer"}, "email": {"type": "string"},
        "active": {"type": "boolean"}, "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "email", "active", "tags"], "additionalProperties": False,
}
SCHEMA = {"type": "object", "properties": {"people": {"type": "array", "items": PERSON}}, "required": ["people"],
          "additionalProperties": False}
DOCUMENT = {"people": [{"name": f"Person number {i}", "age": 20 + i, "email": f"user{i}@example.com",
                        "active": i % 2 == 0, "tags": ["alpha", "beta gamma", "delta"][: i % 3 + 1]}
                       for i in range(8)]}


def train_tokenizer(vocab: int) -> Any:
    """A byte-level BPE of `vocab` tokens trained on the standard library's Python sources."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = [path.read_text(encoding="utf-8", errors="replace")
             for path in sorted(root.rglob("*.py")) if "site-packages" not in path.parts]
    return build_byte_level_tokenizer(vocab, texts)


def make_checkpoint(directory: Path, tokenizer: Any, args: argparse.Namespace) -> Path:
    config = transformers.MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4, num_local_experts=8,
        num_experts_per_tok=2, max_position_embeddings=1024, sliding_window=None,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(config).save_pretrained(directory)
    save_tokenizer(tokenizer, directory)
    return directory


# -- engine ------------------------------------------------------------------------------

def add_batch(engine: LLMEngine, batch: int, guided: GuidedDecoding | None, tokens: int, tag: str) -> None:
    for i in range(batch):
        prompt = torch.randint(10, engine.vocab_size, (16,), generator=torch.Generator().manual_seed(i)).tolist()
        params = SamplingParams(max_tokens=tokens, temperature=1.0, seed=i, ignore_eos=True, guided=guided)
        engine.add_request(EngineRequest(f"{tag}-{i}", prompt, params))


def timed_full_step(engine: LLMEngine, batch: int) -> float | None:
    """Run one step; its time (s) when all `batch` requests decoded in it, else None."""
    decoding = len(engine.scheduler.running) == batch and not engine.scheduler.waiting
    start = time.perf_counter()
    outputs = engine.step()
    elapsed = time.perf_counter() - start
    return elapsed if decoding and len(outputs) == batch and not any(o.finished for o in outputs) else None


def paired_steps(plain: LLMEngine, guided: LLMEngine, spec: GuidedDecoding, batch: int, tokens: int,
                 tag: str) -> list[tuple[float, float]]:
    """The same `batch` requests, unconstrained on `plain` and constrained on `guided`, stepped in
    turns (who goes first alternates): (plain, guided) times of the steps both decoded in full."""
    add_batch(plain, batch, None, tokens, tag)
    add_batch(guided, batch, spec, tokens, tag)
    pairs = []
    turn = 0
    while plain.has_unfinished or guided.has_unfinished:
        order = (plain, guided) if turn % 2 == 0 else (guided, plain)
        times = {id(engine): timed_full_step(engine, batch) if engine.has_unfinished else None for engine in order}
        if times[id(plain)] is not None and times[id(guided)] is not None:
            pairs.append((times[id(plain)], times[id(guided)]))
        turn += 1
    return pairs


def run_engine(args: argparse.Namespace) -> list[dict[str, Any]]:
    tokenizer = train_tokenizer(args.vocab)
    spec = GuidedDecoding.json_schema(SCHEMA)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = make_checkpoint(Path(tmp), tokenizer, args)
        default_threads = torch.get_num_threads()
        for threads in args.threads:
            torch.set_num_threads(threads or default_threads)
            for batch in args.batches:
                plain, guided = (build_engine(EngineConfig(model=str(path), dtype="float32", max_num_seqs=batch),
                                              show_progress=False) for _ in range(2))
                paired_steps(plain, guided, spec, batch, 4, "warmup")  # compiles the schema, warms the caches
                rounds = [paired_steps(plain, guided, spec, batch, args.tokens, f"round{r}") for r in range(args.rounds)]
                plain_ms = [statistics.median(p for p, _ in pairs) * 1e3 for pairs in rounds]
                guided_ms = [statistics.median(g for _, g in pairs) * 1e3 for pairs in rounds]
                ratios = [statistics.median(g / p for p, g in pairs) for pairs in rounds]
                row = {"threads": torch.get_num_threads(), "batch": batch, "vocab": len(tokenizer),
                       "plain_ms": [round(x, 2) for x in plain_ms], "guided_ms": [round(x, 2) for x in guided_ms],
                       "overhead_pct": [round((r - 1) * 100, 1) for r in ratios],
                       "median_overhead_pct": round((statistics.median(ratios) - 1) * 100, 1)}
                rows.append(row)
                if not args.json:
                    print(f"threads {row['threads']} batch {batch:2d}: median step by round, plain {row['plain_ms']} ms, "
                          f"guided {row['guided_ms']} ms; paired overhead by round {row['overhead_pct']} %: "
                          f"median {row['median_overhead_pct']:+.1f}%", flush=True)
    return rows


# -- libraries ---------------------------------------------------------------------------

def llguidance_walk(tokenizer: Any, ids: list[int]) -> tuple[float, Callable[[], list[float]]]:
    import llguidance
    import llguidance.hf

    from moe_serve.engine.core.guided.compiler import JSON_OPTIONS

    lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=len(tokenizer), eos_token=tokenizer.eos_token_id)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults=JSON_OPTIONS)
    start = time.perf_counter()
    template = llguidance.LLMatcher(lltok, grammar, log_level=0)
    compile_s = time.perf_counter() - start
    bitmask = torch.zeros(1, (len(tokenizer) + 31) // 32, dtype=torch.int32)

    def walk() -> list[float]:
        matcher, fills = template.deep_copy(), []
        for token in ids:
            start = time.perf_counter()
            matcher.unsafe_compute_mask_ptr(bitmask.data_ptr(), bitmask.numel() * 4)
            fills.append(time.perf_counter() - start)
            assert matcher.consume_token(token), matcher.get_error()
        assert matcher.is_stopped()
        return fills

    return compile_s, walk


def xgrammar_walk(tokenizer: Any, ids: list[int]) -> tuple[float, Callable[[], list[float]]]:
    import xgrammar

    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer),
                                                   stop_token_ids=[tokenizer.eos_token_id])
    compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    start = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":"))
    compile_s = time.perf_counter() - start
    bitmask = xgrammar.allocate_token_bitmask(1, len(tokenizer))

    def walk() -> list[float]:
        matcher, fills = xgrammar.GrammarMatcher(compiled), []
        for token in ids:
            start = time.perf_counter()
            matcher.fill_next_token_bitmask(bitmask)
            fills.append(time.perf_counter() - start)
            assert matcher.accept_token(token)
        assert matcher.is_terminated()
        return fills

    return compile_s, walk


def byte_level_bytes() -> dict[str, int]:
    """GPT-2's printable stand-in character -> the byte it stands for."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def outlines_walk(tokenizer: Any, ids: list[int]) -> tuple[float, Callable[[], list[float]]]:
    import outlines_core
    from outlines_core.json_schema import build_regex_from_schema

    eos = tokenizer.eos_token_id
    to_byte = byte_level_bytes()
    vocabulary = outlines_core.Vocabulary(eos, {})
    for text, token in tokenizer.get_vocab().items():
        if token != eos and text not in tokenizer.all_special_tokens:
            vocabulary.insert(bytes(to_byte[c] for c in text), token)
    start = time.perf_counter()
    index = outlines_core.Index(build_regex_from_schema(json.dumps(SCHEMA), None), vocabulary)
    compile_s = time.perf_counter() - start
    bitmask = torch.zeros(1, (len(tokenizer) + 31) // 32, dtype=torch.int32)

    def walk() -> list[float]:
        guide, fills = outlines_core.Guide(index), []
        for token in ids[:-1]:  # its guide has no end-of-sequence step
            start = time.perf_counter()
            guide.write_mask_into(bitmask.data_ptr(), bitmask.numel(), 4)
            fills.append(time.perf_counter() - start)
            guide.advance(token, return_tokens=False)
        assert guide.is_finished()
        return fills

    return compile_s, walk


def run_libraries(args: argparse.Namespace) -> list[dict[str, Any]]:
    torch.set_num_threads(1)
    tokenizer = train_tokenizer(args.vocab)
    ids = tokenizer.encode(json.dumps(DOCUMENT, separators=(",", ":")), add_special_tokens=False)
    ids.append(tokenizer.eos_token_id)
    walks: dict[str, tuple[float, Callable[[], list[float]]]] = {}
    for name, make in (("llguidance", llguidance_walk), ("xgrammar", xgrammar_walk), ("outlines-core", outlines_walk)):
        try:
            walks[name] = make(tokenizer, ids)
        except ImportError as exc:
            print(f"{name}: not installed ({exc})")
    means: dict[str, list[float]] = {name: [] for name in walks}
    p99: dict[str, list[float]] = {name: [] for name in walks}
    for _ in range(args.rounds):
        for name, (_, walk) in walks.items():
            fills = sorted(walk())
            means[name].append(statistics.mean(fills) * 1e6)
            p99[name].append(fills[int(len(fills) * 0.99)] * 1e6)
    rows = []
    for name, (compile_s, _) in walks.items():
        row = {"library": name, "vocab": len(tokenizer), "tokens": len(ids), "compile_ms": round(compile_s * 1e3, 1),
               "mean_us": [round(x, 1) for x in means[name]], "median_mean_us": round(statistics.median(means[name]), 1),
               "min_mean_us": round(min(means[name]), 1),
               "median_p99_us": round(statistics.median(p99[name]), 1)}
        rows.append(row)
        if not args.json:
            print(f"{name:13s} vocab {row['vocab']} compile {row['compile_ms']:8.1f} ms; mask per token, mean by round "
                  f"{row['mean_us']} us: median {row['median_mean_us']} us, best {row['min_mean_us']} us, "
                  f"p99 {row['median_p99_us']} us")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("engine", "libraries"))
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--threads", type=int, nargs="+", default=[0, 1], help="torch threads; 0: torch's default")
    parser.add_argument("--tokens", type=int, default=48, help="output tokens per request")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = run_engine(args) if args.what == "engine" else run_libraries(args)
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
