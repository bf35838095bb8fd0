"""The steps of `benchmarks/gpu_validate.sh`: each writes one JSON part; `merge` joins them into one file.

    python -m benchmarks.gpu_probe deps WHEEL_DIR TARGET   # install the carried wheels whose modules are missing
    python -m benchmarks.gpu_probe env|build|decode|serve --out PARTS_DIR [--dry-run]
    python -m benchmarks.gpu_probe merge --out PARTS_DIR --result FILE.json

Without CUDA every step runs its logic at tiny CPU sizes or says why it skipped (a dry run of the
script, not a measurement). `decode` builds a random model of DeepSeek-V2-Lite's expert geometry
(hidden 2048, 64 routed experts of 1408, top-6, shared 2 x 1408) with the carried trace's routing
replayed, and compares each setting's tok/s with its physical limit: per token the larger of the
bytes missed over the measured host-to-device bandwidth and the bytes read from device memory over
the measured device-memory bandwidth.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path
from xml.etree import ElementTree

MIB = 1 << 20


def write_part(out: Path, name: str, record: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(record, indent=1, default=str))
    print(json.dumps({name: record}, default=str)[:2000], flush=True)


def wheel_modules(wheel: Path) -> set[str]:
    """The top-level import names a wheel installs (from its file list)."""
    names = set()
    with zipfile.ZipFile(wheel) as archive:
        for entry in archive.namelist():
            top = entry.split("/")[0]
            if top.endswith((".dist-info", ".data")):
                continue
            names.add(top.removesuffix(".py"))
    return {name for name in names if name.isidentifier()}


def importable(module: str, extra_path: Path | None = None) -> bool:
    """Whether `import module` works in a fresh interpreter (with `extra_path` first on its path)."""
    env = dict(os.environ)
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(extra_path), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, env=env).returncode == 0


def deps(wheel_dir: Path, target: Path) -> dict:
    """Installs (pip --target, no index) each carried wheel whose modules do not import; if the
    server's imports still fail, installs the whole set (mismatched versions of pydantic and its
    core, say)."""
    wheels = sorted(wheel_dir.glob("*.whl"))
    missing = [w for w in wheels if not all(importable(m) for m in wheel_modules(w))]
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--upgrade", "--target", str(target)]
    if missing:
        subprocess.run(pip + [str(w) for w in missing], check=True)
    server_imports = "fastapi, uvicorn, pydantic, llguidance, prometheus_client, pytest"
    if wheels and not importable(server_imports, target):
        subprocess.run(pip + [str(w) for w in wheels], check=True)
        missing = wheels
    runtime = ("transformers", "safetensors", "tokenizers", "numpy", "yaml", "jinja2", "tqdm", "ninja",
               "swagger_ui_bundle", "prometheus_client", "fastapi", "uvicorn", "pydantic", "llguidance", "pytest")
    return {"installed": [w.name for w in missing], "server_imports_ok": importable(server_imports, target),
            "missing_runtime_modules": [name for name in runtime if not importable(name, target)]}


def nvidia_smi() -> dict:
    fields = ["name", "driver_version", "memory.total", "pcie.link.gen.current", "pcie.link.width.current",
              "pcie.link.gen.max", "pcie.link.width.max"]
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as error:
        return {"nvidia_smi": f"unavailable ({type(error).__name__})"}
    return dict(zip(fields, (value.strip() for value in out.splitlines()[0].split(","))))


def env_step(args: argparse.Namespace) -> dict:
    import torch

    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    mem_total = next((int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0)
    record: dict = {"python": sys.version.split()[0], "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                    "cuda_available": torch.cuda.is_available(), "host_memory_bytes": mem_total,
                    "pinned_memory_limit": {"memlock_soft": soft, "memlock_hard": hard,
                                            "unlimited": soft == resource.RLIM_INFINITY},
                    **nvidia_smi()}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        record["nvcc"] = subprocess.run(["nvcc", "--version"], capture_output=True, text=True,
                                        timeout=30).stdout.strip().splitlines()[-1]
    if torch.cuda.is_available():
        from moe_serve.engine.host_memory import pinned_buffer

        props = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info()
        record.update(gpu=props.name, compute_capability=f"{props.major}.{props.minor}",
                      device_free_bytes=free, device_total_bytes=total)
        started = time.perf_counter()
        buffer = pinned_buffer(4 << 30, what="4 GiB probe buffer")  # the host tier's exact-size pinning
        record["exact_size_pinning"] = {"bytes": buffer.numel(), "pinned": buffer.is_pinned(),
                                        "seconds": round(time.perf_counter() - started, 2)}
    return record


def build_step(args: argparse.Namespace) -> dict:
    """Builds (or finds) the copy-engine extension for this machine, timed, and says which backend runs."""
    import torch

    from moe_serve.cuda_ext import load_copy_engine
    from moe_serve.cuda_ext.native import CPU_SOURCES, CSRC_DIR, CUDA_SOURCES, build_dir, is_stale, load_extension

    with_cuda = torch.cuda.is_available()
    name = "moe_copy_engine_cuda" if with_cuda else "moe_copy_engine_cpu"
    sources = [CSRC_DIR / s for s in CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())]
    cached = not is_stale(build_dir(with_cuda) / f"{name}.so", sources)
    started = time.perf_counter()
    load_extension(with_cuda)
    seconds = time.perf_counter() - started
    engine = load_copy_engine(torch.device("cuda" if with_cuda else "cpu"))
    backend = engine.backend.value
    engine.shutdown()
    return {"flavour": "cuda" if with_cuda else "cpu", "seconds": round(seconds, 1), "was_cached": cached,
            "backend": backend, "backend_ok": backend == ("cuda" if with_cuda else "cpu"),
            "arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST")}


def device_bandwidths(nbytes: int) -> dict:
    """Pinned host-to-device copy of one `nbytes` buffer and a device-to-device copy (read + write),
    best of 5, in GB/s; zeros without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return {"link_gbps": 0.0, "hbm_gbps": 0.0}
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)

    def best(run) -> float:
        run()
        torch.cuda.synchronize()
        times = []
        for _ in range(5):
            started = time.perf_counter()
            run()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        return min(times)

    link = nbytes / best(lambda: a.copy_(host, non_blocking=True)) / 1e9
    hbm = 2 * nbytes / best(lambda: b.copy_(a)) / 1e9
    return {"link_gbps": round(link, 2), "hbm_gbps": round(hbm, 1)}


def decode_step(args: argparse.Namespace) -> dict:
    """Resident and offloaded decode tok/s (fractions x prefetch) with the trace's routing, and each
    setting's physical limit."""
    import tempfile

    import torch

    from benchmarks.prefetch_decode import make_checkpoint, measure, replaying_engine
    from moe_serve.engine.offload.provider import OffloadedExperts
    from moe_serve.engine.planning import expert_nbytes, non_expert_nbytes
    from moe_serve.engine.traces.trace_file import load_trace

    cuda = torch.cuda.is_available()
    trace = load_trace(args.trace)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    sizes = (dict(hidden=2048, moe_intermediate=1408, shared_intermediate=2816, heads=16, layers=args.layers,
                  tokens=64, warmup_requests=3, prompt_len=32) if cuda else
             dict(hidden=128, moe_intermediate=64, shared_intermediate=128, heads=4, layers=4,
                  tokens=6, warmup_requests=1, prompt_len=8))
    bench = argparse.Namespace(**sizes, first_layer=0, batch=1, device="cuda" if cuda else "cpu",
                               dtype="bfloat16" if cuda else "float32")
    bandwidth = device_bandwidths(1 << 30)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.scratch) as tmp:
        started = time.perf_counter()
        path = make_checkpoint(Path(tmp), trace, bench)
        checkpoint_s = time.perf_counter() - started
        settings = [("resident", None, "none")] + [
            ("offload", fraction, prefetch) for fraction in (1.0, 0.5, 0.25) for prefetch in ("none", "affinity")]
        for mode, fraction, prefetch in settings:
            overrides = ({"offload": "off"} if fraction is None else
                         {"offload": "on", "expert_cache_fraction": fraction, "prefetch": prefetch})
            started = time.perf_counter()
            engine = replaying_engine(path, trace, bench, **overrides)
            load_s = time.perf_counter() - started
            row = measure(engine, bench)
            spec = engine.runner.model.spec
            dtype = torch.bfloat16 if cuda else torch.float32
            one_expert = expert_nbytes(spec, dtype)
            hbm_bytes = non_expert_nbytes(spec, dtype) + spec.num_moe_layers * spec.top_k * one_expert
            missed_bytes = row["misses_per_token"] * one_expert
            limit = {}
            if cuda:
                hbm_s = hbm_bytes / (bandwidth["hbm_gbps"] * 1e9)
                link_s = missed_bytes / (bandwidth["link_gbps"] * 1e9)
                limit_tok_s = 1.0 / max(hbm_s, link_s)
                limit = {"hbm_s_per_token": hbm_s, "link_s_per_token": link_s, "limit_tok_s": round(limit_tok_s, 1),
                         "bound_by": "link" if link_s > hbm_s else "hbm",
                         "pct_of_limit": round(100 * row["tok_s"] / limit_tok_s, 1)}
            is_offloaded = isinstance(engine.runner.model.experts, OffloadedExperts)
            rows.append({"mode": mode, "fraction": fraction, "prefetch": prefetch, "offloaded": is_offloaded,
                         "load_s": round(load_s, 1), **{k: round(v, 4) for k, v in row.items()},
                         "expert_bytes": one_expert, "missed_bytes_per_token": round(missed_bytes),
                         "hbm_bytes_per_token": hbm_bytes, **limit})
            del engine
            if cuda:
                torch.cuda.empty_cache()
            geometry = {**sizes, "experts": trace.num_experts, "top_k": trace.top_k, "trace": Path(args.trace).name,
                        "dtype": bench.dtype, "batch": 1, "checkpoint_s": round(checkpoint_s, 1)}
            partial = {"geometry": geometry, **bandwidth, "rows": rows, "complete": len(rows) == len(settings)}
            (Path(args.out) / "decode.json").write_text(json.dumps(partial, default=str))  # kept if time runs out
    return partial


def serve_step(args: argparse.Namespace) -> dict:
    """The server on the demo model (offloaded, half the experts): health, one chat completion,
    /metrics, then SIGTERM must drain and exit 0; the start-up log's copy-backend and kernel lines."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    log_path = Path(args.out) / "serve.log"
    port = args.port
    command = [sys.executable, "-m", "moe_serve.server.cli", "serve", "--device", device, "--offload", "on",
               "--expert-cache-fraction", "0.5", "--port", str(port), "--log-level", "info"]
    record: dict = {"device": device, "command": " ".join(command[1:])}
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            record.update(_exercise_server(server, port, args.health_timeout))
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                record["exit_code_after_sigterm"] = server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                record["exit_code_after_sigterm"] = "hung (killed)"
    lines = log_path.read_text(errors="replace").splitlines()
    record["startup_log"] = [line[-200:] for line in lines
                             if any(k in line for k in ("copy engine", "kernels", "offloading", "KV cache", "ERROR"))][:12]
    record["ok"] = record.get("chat_status") == 200 and record["exit_code_after_sigterm"] == 0
    return record


def _exercise_server(server: subprocess.Popen, port: int, health_timeout: float) -> dict:
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + health_timeout
    while True:
        if server.poll() is not None:
            return {"error": f"server exited with {server.returncode} before it was healthy"}
        try:
            urllib.request.urlopen(f"{base}/health", timeout=2)
            break
        except OSError:
            if time.monotonic() > deadline:
                return {"error": f"not healthy after {health_timeout:.0f}s"}
            time.sleep(1)
    record: dict = {"healthy_after_s": round(health_timeout - (deadline - time.monotonic()), 1)}
    models = json.loads(urllib.request.urlopen(f"{base}/v1/models", timeout=10).read())
    body = json.dumps({"model": models["data"][0]["id"], "max_tokens": 16,
                       "messages": [{"role": "user", "content": "Hello"}]}).encode()
    request = urllib.request.Request(f"{base}/v1/chat/completions", body, {"Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=60) as response:
        record["chat_status"] = response.status
        record["chat_usage"] = json.loads(response.read()).get("usage")
    record["chat_s"] = round(time.perf_counter() - started, 2)
    metrics = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
    record["expert_metrics"] = [line for line in metrics.splitlines()
                                if line.startswith("moe_serve_expert_cache") and "{" not in line][:10]
    return record


def junit_summary(path: Path) -> dict:
    """Counts and failing test names from a pytest --junitxml file."""
    if not path.exists():
        return {"status": "no report"}
    root = ElementTree.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    cases = list(suite.iter("testcase")) if suite is not None else []
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in cases if c.find("failure") is not None
              or c.find("error") is not None]
    skipped = [c for c in cases if c.find("skipped") is not None]
    reasons = sorted({c.find("skipped").get("message", "") for c in skipped})
    return {"tests": len(cases), "failed": len(failed), "skipped": len(skipped),
            "passed": len(cases) - len(failed) - len(skipped), "failing": failed, "skip_reasons": reasons[:5]}


def merge(out: Path, result: Path, dry_run: bool) -> dict:
    """One JSON from the parts, the step records the shell wrote, and the acceptance figures."""
    merged: dict = {"dry_run": dry_run, "steps": {}}
    for part in sorted(out.glob("*.json")):
        name = part.stem
        data = json.loads(part.read_text())
        if name.endswith(".step"):
            merged["steps"][name.removesuffix(".step")] = data
        else:
            merged[name] = data
    merged["tests_gpu"] = junit_summary(out / "tests_gpu.xml")
    merged["acceptance"] = acceptance(merged)
    result.write_text(json.dumps(merged, indent=1, default=str))
    return merged


def acceptance(merged: dict) -> dict:
    """The issue's device lines: copy >= 90% of the pinned peak, offloaded decode >= 80% of the
    link-bound limit at fraction 0.25, every step green."""
    figures: dict = {"steps_green": all(s.get("rc") == 0 for s in merged["steps"].values())}
    copy_rows = merged.get("copy", {}).get("rows", [])
    engine_rows = [r for r in copy_rows if r.get("method") == "engine:cuda"]
    if engine_rows:
        figures["copy_pct_of_peak"] = {r["size_mib"]: r["pct_of_peak"] for r in engine_rows}
        figures["copy_ok"] = all(r["pct_of_peak"] >= 90 for r in engine_rows if r["size_mib"] >= 16)
    quarter = [r for r in merged.get("decode", {}).get("rows", []) if r.get("fraction") == 0.25 and "pct_of_limit" in r]
    if quarter:
        figures["offload_0.25_pct_of_limit"] = {r["prefetch"]: r["pct_of_limit"] for r in quarter}
        figures["offload_ok"] = max(r["pct_of_limit"] for r in quarter) >= 80
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["deps", "env", "build", "decode", "serve", "merge"])
    parser.add_argument("paths", nargs="*", help="deps: WHEEL_DIR TARGET_DIR")
    parser.add_argument("--out", default="gpu_out", help="the parts directory")
    parser.add_argument("--result", default="gpu_validate.json")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--trace", default=".gpu/traces/deepseek-v2-lite-puffin-train.npz")
    parser.add_argument("--layers", type=int, default=8, help="decode: MoE layers of the DeepSeek-size model")
    parser.add_argument("--scratch", default=None, help="decode: where the random checkpoint is written")
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--health-timeout", type=float, default=150.0)
    args = parser.parse_args()
    out = Path(args.out)
    if args.step == "deps":
        wheel_dir, target = (Path(p) for p in args.paths)
        write_part(out, "deps", deps(wheel_dir, target))
    elif args.step == "merge":
        merged = merge(out, Path(args.result), args.dry_run)
        print(json.dumps(merged["acceptance"]))
    else:
        step = {"env": env_step, "build": build_step, "decode": decode_step, "serve": serve_step}[args.step]
        write_part(out, args.step, step(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
