"""The `moe-serve` command: `serve`, `generate`, `plan` and `trace` subcommands.

Errors a user can cause (bad flags, missing or corrupt checkpoints, prompts too long,
invalid sampling values) print one line to stderr and exit non-zero, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from moe_serve.engine.config import DType, EngineConfig
from moe_serve.engine.errors import EngineError
from moe_serve.server.config import ConfigError, LogLevel, ServeConfig, load_config

logger = logging.getLogger("moe_serve")


def _add_config_flags(parser: argparse.ArgumentParser, model: type[BaseModel], skip: set[str]) -> None:
    """One `--field-name` flag per config field (values validated later by pydantic)."""
    group = parser.add_argument_group("settings (also from --config YAML and MOE_SERVE_<FIELD> variables)")
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        helptext = field.description or ""
        annotation = getattr(field.annotation, "__members__", None)
        if annotation:
            helptext += f" {{{', '.join(m.value for m in field.annotation)}}}"
        group.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None, metavar=name.upper(),
                           help=f"{helptext} (default: {field.default})".strip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-serve", description="Serve Mixture-of-Experts models with an OpenAI-compatible API."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{serve,generate,plan,trace}")

    serve = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server",
                           description="Run the OpenAI-compatible HTTP server (the demo model when --model is not given).")
    serve.add_argument("--config", type=Path, default=None, help="YAML profile, e.g. configs/cpu.yaml")
    _add_config_flags(serve, ServeConfig, skip=set())

    gen = sub.add_parser("generate", help="generate text for one prompt and exit",
                         description="Generate a completion for one prompt (raw text, or chat with --chat).")
    gen.add_argument("--prompt", required=True, help="prompt text")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    gen.add_argument("--max-tokens", type=int, default=32, help="tokens to generate (default 32)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default 0)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")
    gen.add_argument("--json", action="store_true", help="print one JSON object (token_ids, text, ...)")
    gen.add_argument("--config", type=Path, default=None, help="YAML profile, e.g. configs/cpu.yaml")
    _add_config_flags(gen, EngineConfig, skip=set())

    plan = sub.add_parser("plan", help="size the expert cache and memory for a checkpoint (no weights read)",
                          description="From the checkpoint's config.json alone: expert and non-expert sizes, KV "
                          "bytes per token, the expert cache serve would get on --gpu-gb, the smallest GPU and host "
                          "RAM, and the expected expert bytes copied per token.")
    plan.add_argument("--model", type=Path, required=True, help="checkpoint directory (config.json is enough)")
    plan.add_argument("--gpu-gb", type=float, required=True, help="GPU memory to plan for, in GiB")
    plan.add_argument("--host-gb", type=float, default=None, help="host RAM for the host tier, in GiB")
    plan.add_argument("--dtype", default="auto", choices=[d.value for d in DType])
    plan.add_argument("--expert-dtype", default="auto",
                      help="routed experts' storage, as serve's --expert-dtype (auto, model, int8, int4[-gN][-sym], mxfp4)")
    plan.add_argument("--max-model-len", type=int, default=None,
                      help="context length the KV cache holds (default 4096, at most the model's)")
    plan.add_argument("--max-num-seqs", type=int, default=1, help="sequences of max-model-len in the KV cache")
    plan.add_argument("--trace", type=Path, default=None,
                      help="routing trace (npz/jsonl) of this model: expected copies by replay instead of uniform")
    plan.add_argument("--trace-tokens", type=int, default=None, help="replay only the trace's first N tokens")
    plan.add_argument("--json", action="store_true", help="print one JSON object")

    from moe_serve.engine.trace_cli import add_trace_parser

    add_trace_parser(sub)
    return parser


def _configure_logging(level: LogLevel) -> None:
    logging.basicConfig(level=level.value.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)


def _engine_flags(args: argparse.Namespace, cls: type[BaseModel]) -> dict[str, Any]:
    return {name: getattr(args, name, None) for name in cls.model_fields}


def run_generate(args: argparse.Namespace) -> int:
    """Generate for one prompt with the synchronous engine and print the result."""
    from moe_serve.engine.builder import build_engine
    from moe_serve.engine.core.request import EngineRequest
    from moe_serve.engine.core.sampling_params import SamplingParams

    config = load_config(EngineConfig, args.config, _engine_flags(args, EngineConfig))
    _configure_logging(LogLevel.WARNING)
    engine = build_engine(config, show_progress=not args.json)  # a bar on a terminal only
    tokenizer = engine.tokenizer
    if args.chat:
        prompt_ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": args.prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
    else:
        prompt_ids = tokenizer.encode(args.prompt)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, ignore_eos=args.ignore_eos)
    engine.add_request(EngineRequest("generate-0", list(prompt_ids), params))
    token_ids: list[int] = []
    text, finish_reason = "", None
    while engine.has_unfinished:
        for out in engine.step():
            if out.error is not None:
                raise out.error  # main() prints it as one `moe-serve: error:` line, exit 1
            token_ids += out.new_token_ids
            text += out.new_text
            finish_reason = out.finish_reason
    if args.json:
        print(json.dumps({"model": engine.model_name, "prompt_token_ids": list(prompt_ids), "token_ids": token_ids,
                          "text": text, "finish_reason": finish_reason.value if finish_reason else None}))
    else:
        print(text)
    return 0


def run_plan(args: argparse.Namespace) -> int:
    """Print the offloading plan for a checkpoint config."""
    from moe_serve.engine.planning import format_plan, make_plan

    if args.gpu_gb <= 0 or (args.host_gb is not None and args.host_gb <= 0) or args.max_num_seqs < 1 \
            or (args.max_model_len is not None and args.max_model_len < 16) \
            or (args.trace_tokens is not None and args.trace_tokens < 1):
        raise ConfigError("--gpu-gb and --host-gb must be > 0, --max-num-seqs and --trace-tokens >= 1, "
                          "--max-model-len >= 16")
    plan = make_plan(args.model, args.gpu_gb, args.host_gb, DType(args.dtype), args.max_model_len,
                     args.max_num_seqs, args.trace, args.trace_tokens, args.expert_dtype)
    print(json.dumps(plan.as_dict()) if args.json else format_plan(plan, args.model))
    return 0


def run_serve(args: argparse.Namespace) -> int:
    """Start the engine thread and the HTTP server; SIGTERM drains then exits 0."""
    from moe_serve.server.serve import serve

    config = load_config(ServeConfig, args.config, _engine_flags(args, ServeConfig))
    _configure_logging(config.log_level)
    return serve(config)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return run_serve(args)
        if args.command == "generate":
            return run_generate(args)
        if args.command == "plan":
            return run_plan(args)
        return int(args.handler(args))
    except (ConfigError, EngineError) as exc:
        print(f"moe-serve: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
