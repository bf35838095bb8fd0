"""Peak host RSS of serving a gpt-oss-shaped MXFP4 checkpoint: experts kept 4-bit vs expanded.

Writes a random gpt-oss checkpoint in the published MXFP4 layout (the experts' `gate_up_proj` and
`down_proj` as `_blocks` uint8 [E, out, in / 32, 16] and `_scales` uint8 [E, out, in / 32], with
`quantization_config: mxfp4`; everything else bf16), then in a fresh process per setting builds the
engine (`--expert-dtype auto`: the codes go 4-bit from disk to host tier to slot; `model`: expanded
to bf16 at load) and decodes a few tokens; reports the process's peak RSS (`ru_maxrss`, memory-mapped
checkpoint pages included) and the routed experts' bytes as stored.

    python -m benchmarks.quant_mxfp4_rss [--hidden 1024] [--layers 8] [--experts 32] [--json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

from moe_serve.engine.model.tokenizer_builder import build_byte_level_tokenizer, save_tokenizer

MEASURE = """
import json, resource, sys
from moe_serve.engine.builder import build_engine
from moe_serve.engine.config import EngineConfig
from moe_serve.engine.core.request import EngineRequest
from moe_serve.engine.core.sampling_params import SamplingParams
path, expert_dtype, offload = sys.argv[1:4]
cache = dict(offload="off") if offload == "off" else dict(offload="on", expert_cache_fraction=float(offload))
engine = build_engine(EngineConfig(model=path, dtype="bfloat16", expert_dtype=expert_dtype, **cache), show_progress=False)
engine.add_request(EngineRequest("r", list(range(3, 19)), SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)))
while engine.has_unfinished:
    engine.step()
experts = engine.runner.model.experts
stored = experts.cache.store.nbytes if hasattr(experts, "cache") else experts.nbytes()
print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "experts_mib": stored / 2**20, "format": engine.runner.model.expert_format.name}))
"""


def make_checkpoint(directory: Path, hidden: int, layers: int, experts: int) -> Path:
    """A random gpt-oss checkpoint, experts in the published MXFP4 layout, the rest bf16."""
    tokenizer = build_byte_level_tokenizer()
    config = transformers.GptOssConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden, num_hidden_layers=layers,
        num_attention_heads=16, num_key_value_heads=4, head_dim=64, num_local_experts=experts, num_experts_per_tok=4,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
        sliding_window=128, max_position_embeddings=4096, tie_word_embeddings=False,
    )
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in transformers.GptOssForCausalLM(config).named_parameters()}
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name, shape in shapes.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):  # [E, in, out] -> [E, out, in / 32, 16]
            num, inner, outer = shape
            tensors[name + "_blocks"] = torch.randint(0, 256, (num, outer, inner // 32, 16), dtype=torch.uint8, generator=gen)
            tensors[name + "_scales"] = torch.randint(118, 124, (num, outer, inner // 32), dtype=torch.uint8, generator=gen)
        elif "norm" in name:
            tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensors[name] = (torch.randn(shape, generator=gen) * 0.02).bfloat16()
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    config.architectures = ["GptOssForCausalLM"]
    config.quantization_config = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    config.save_pretrained(directory)
    save_tokenizer(tokenizer, directory)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = make_checkpoint(Path(tmp), args.hidden, args.layers, args.experts)
        checkpoint_mib = (path / "model.safetensors").stat().st_size / 2**20
        for expert_dtype in ("auto", "model"):
            for offload in ("off", "0.5"):
                done = subprocess.run([sys.executable, "-c", MEASURE, str(path), expert_dtype, offload],
                                      capture_output=True, text=True, check=True)
                rows.append({"expert_dtype": expert_dtype, "offload": offload, "checkpoint_mib": checkpoint_mib,
                             **json.loads(done.stdout.strip().splitlines()[-1])})
    if args.json:
        print(json.dumps(rows))
        return
    print(f"gpt-oss shape: hidden {args.hidden}, {args.layers} layers x {args.experts} experts, MXFP4 experts; "
          f"checkpoint {checkpoint_mib:.0f} MiB")
    print(f"{'expert-dtype':>12} {'stored as':>9} {'offload':>7} {'experts MiB':>11} {'peak RSS MiB':>12}")
    for r in rows:
        print(f"{r['expert_dtype']:>12} {r['format']:>9} {r['offload']:>7} {r['experts_mib']:>11.0f} {r['peak_rss_mib']:>12.0f}")


if __name__ == "__main__":
    main()
