"""`moe-serve generate` end to end in a subprocess: sharded checkpoints and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import hf_greedy, hf_model, make_tiny_checkpoint

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "moe_serve.server.cli", *args], cwd=REPO, capture_output=True, text=True,
                          env=full_env, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    path = make_tiny_checkpoint("qwen2_moe", tmp_path_factory.mktemp("sharded"), seed=3, max_shard_size="30KB")
    assert (path / "model.safetensors.index.json").is_file()
    return path


def test_generate_json_on_a_sharded_checkpoint_returns_transformers_greedy_tokens(sharded: Path) -> None:
    result = run_cli("generate", "--model", str(sharded), "--prompt", "The quick brown fox", "--max-tokens", "12",
                     "--temperature", "0", "--ignore-eos", "--json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["token_ids"] == hf_greedy(hf_model(sharded), payload["prompt_token_ids"], 12)
    assert isinstance(payload["text"], str) and payload["finish_reason"] == "length"


def test_missing_model_directory(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"),
                          "model directory not found")


def test_unsupported_architecture(tmp_path: Path) -> None:
    import transformers

    transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                             vocab_size=64, architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path)
    assert_one_line_error(run_cli("generate", "--model", str(tmp_path), "--prompt", "hi"), "unsupported architecture")


def test_unsupported_config_is_refused(tmp_path: Path) -> None:
    path = make_tiny_checkpoint("mixtral", tmp_path, hidden_act="gelu")
    assert_one_line_error(run_cli("generate", "--model", str(path), "--prompt", "hi"), "hidden_act 'gelu'")


@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
def test_corrupt_or_truncated_safetensors(tmp_path: Path, damage: str) -> None:
    path = make_tiny_checkpoint("olmoe", tmp_path)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(b"\x13" * 64 + data[64:] if damage == "corrupt" else data[: len(data) // 2])
    assert_one_line_error(run_cli("generate", "--model", str(path), "--prompt", "hi"), "safetensors")


def test_prompt_longer_than_the_context(checkpoint_factory) -> None:
    path = checkpoint_factory("mixtral")
    result = run_cli("generate", "--model", str(path), "--prompt", "word " * 200, "--max-model-len", "32")
    assert_one_line_error(result, "maximum context length is 32")


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--temperature", "5"], "temperature"),
        (["--top-p", "0"], "top_p"),
        (["--max-tokens", "0"], "max_tokens"),
        (["--kv-cache-gb", "-1"], "kv_cache_gb"),
        (["--dtype", "float8"], "dtype"),
    ],
)
def test_invalid_values_name_the_field(checkpoint_factory, flags: list[str], fragment: str) -> None:
    path = checkpoint_factory("mixtral")
    assert_one_line_error(run_cli("generate", "--model", str(path), "--prompt", "hi", *flags), fragment)


def test_bad_yaml_profile_value_names_the_field(tmp_path: Path) -> None:
    profile = tmp_path / "bad.yaml"
    profile.write_text("max_num_seqs: 0\n")
    assert_one_line_error(run_cli("generate", "--prompt", "hi", "--config", str(profile)), "max_num_seqs")


def test_environment_overrides_profile(tmp_path: Path, checkpoint_factory) -> None:
    path = checkpoint_factory("mixtral")
    profile = tmp_path / "p.yaml"
    profile.write_text(f"model: {path}\nmax_model_len: 4096\n")
    result = run_cli("generate", "--prompt", "word " * 100, "--config", str(profile),
                     env={"MOE_SERVE_MAX_MODEL_LEN": "64"})
    assert_one_line_error(result, "maximum context length is 64")


def test_help_on_every_command() -> None:
    for args in (["--help"], ["serve", "--help"], ["generate", "--help"], ["trace", "--help"]):
        result = run_cli(*args)
        assert result.returncode == 0 and "usage" in result.stdout


def test_http_settings_come_from_flags_environment_and_yaml(tmp_path: Path) -> None:
    from moe_serve.server.cli import build_parser
    from moe_serve.server.config import ConfigError, ServeConfig, load_config

    profile = tmp_path / "http.yaml"
    profile.write_text("allowed_hosts: [localhost, '*.example.com']\nmax_request_bytes: 2097152\n")
    args = build_parser().parse_args(["serve", "--request-timeout-s", "5", "--docs", "true", "--api-key", "k",
                                      "--auth-health-and-metrics", "true"])
    flags = {name: getattr(args, name) for name in ServeConfig.model_fields}
    config = load_config(ServeConfig, profile, flags, environ={"MOE_SERVE_MAX_REQUEST_BYTES": "3000000"})
    assert config.allowed_hosts == ["localhost", "*.example.com"] and config.max_request_bytes == 3_000_000
    assert (config.request_timeout_s, config.docs, config.auth_health_and_metrics) == (5.0, True, True)
    hosts = load_config(ServeConfig, None, {"allowed_hosts": "localhost, 127.0.0.1"}, environ={})
    assert hosts.allowed_hosts == ["localhost", "127.0.0.1"]
    defaults = load_config(ServeConfig, None, {}, environ={"MOE_SERVE_ALLOWED_HOSTS": ""})
    assert (defaults.allowed_hosts, defaults.docs, defaults.auth_health_and_metrics) == (None, False, False)
    assert (defaults.max_request_bytes, defaults.request_timeout_s) == (4 * 2**20, 30.0)
    with pytest.raises(ConfigError, match="auth_health_and_metrics .*requires api_key"):
        load_config(ServeConfig, None, {"auth_health_and_metrics": "true"}, environ={})
    with pytest.raises(ConfigError, match="request_timeout_s"):
        load_config(ServeConfig, None, {"request_timeout_s": "0"}, environ={})


def test_generate_request_failing_in_the_engine_is_one_error_line(tmp_path: Path) -> None:
    """A checkpoint whose output head is NaN: the sampler fails the row, and `generate` says so
    (exit 1, one line) instead of printing an empty text that ended in `abort`."""
    from safetensors.torch import load_file, save_file

    path = make_tiny_checkpoint("mixtral", tmp_path / "nan-head")
    weights = load_file(path / "model.safetensors")
    weights["lm_head.weight"].fill_(float("nan"))
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    assert_one_line_error(run_cli("generate", "--model", str(path), "--prompt", "hi", "--max-tokens", "3"),
                          "non-finite logits")
