#!/usr/bin/env bash
# One-shot validation of the CUDA path on a lent GPU machine; writes ONE JSON ($OUT/gpu_validate.json).
#   bash benchmarks/gpu_validate.sh          # from the repository root; about 6-8 minutes on one GPU
# The machine has Python 3.12 with its own CUDA torch, nvcc and ninja but no FastAPI/pydantic/uvicorn and
# no network: the wheels it lacks and the routing trace travel in the ignored folder .gpu/ (see
# docs/benchmarks.md "GPU validation" for how to fill it and the exact run call). Without CUDA it dry-runs:
# tiny CPU sizes, CUDA-only steps skipped with their reason. Every step has its own time limit; a step
# that fails or times out is recorded (rc, seconds) and the next one runs.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
KIT=${GPU_KIT:-.gpu}
PARTS="$OUT/parts"
mkdir -p "$PARTS"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
SITE=${TMPDIR:-/tmp}/moe-serve-gpu-site
DRY=""
if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  DRY="--dry-run"
  echo "no CUDA device: dry run (tiny CPU sizes, CUDA-only steps skipped)"
fi

step() {  # step NAME LIMIT_S COMMAND...: runs with a time limit, records rc and seconds as NAME.step.json
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 8 "$OUT/$name.log"
  echo "{\"rc\": $rc, \"seconds\": $((SECONDS - t0)), \"limit_s\": $limit}" > "$PARTS/$name.step.json"
  echo "=== $name rc=$rc in $((SECONDS - t0))s"
}

# 0. moe_serve importable: the editable install if setuptools can do it offline, else a folder of links
#    (moe_serve/{server,engine,cache_policies,cuda_ext} -> the checkout) on PYTHONPATH; then the carried wheels.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if ! python3 -c "import moe_serve.engine" 2>/dev/null; then
  if ! { python3 -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 77)" 2>/dev/null \
         && timeout 120 python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > "$OUT/install.log" 2>&1 \
         && python3 -c "import moe_serve.engine" 2>/dev/null; }; then
    mkdir -p "$SITE/shim/moe_serve"
    for package in server engine cache_policies cuda_ext; do ln -sfn "$PWD/$package" "$SITE/shim/moe_serve/$package"; done
    export PYTHONPATH=$SITE/shim:$PYTHONPATH
    echo "moe_serve imported through links in $SITE/shim"
  fi
fi
if [ -d "$KIT/whl" ]; then
  step deps 180 python3 -m benchmarks.gpu_probe deps "$KIT/whl" "$SITE/deps" --out "$PARTS"
  export PYTHONPATH=$SITE/deps:$PYTHONPATH  # first: a partial set of the wheels may shadow a mismatched install
fi

# 1. environment: GPU, driver, PCIe link, pinned-memory limit
step env 60 python3 -m benchmarks.gpu_probe env --out "$PARTS"
# 2. the copy engine's extension, built as the server's first start would, timed; which backend runs
step build 300 python3 -m benchmarks.gpu_probe build --out "$PARTS"
# 3. the repository's GPU tests (skipped, with their reason, without CUDA)
step tests_gpu 150 python3 -m pytest -q -p no:cacheprovider tests/gpu --junitxml="$PARTS/tests_gpu.xml"
# 4. copy GB/s of the engines against the pinned cudaMemcpy peak (RAM -> RAM against memcpy on a CPU)
if [ -z "$DRY" ]; then copy_sizes=(--sizes-mib 4 16 64 --copies 32); else copy_sizes=(--sizes-mib 1 4 --copies 8 --repeats 2); fi
step copy 90 bash -c "python3 -m benchmarks.copy_bandwidth --json ${copy_sizes[*]} > '$PARTS/copy.json.tmp' && mv '$PARTS/copy.json.tmp' '$PARTS/copy.json'"
# 5. decode tok/s, resident and offloaded at fractions 1.0/0.5/0.25 with and without prefetch, against each
#    setting's physical limit (DeepSeek-V2-Lite expert geometry, the trace's routing replayed)
step decode 240 python3 -m benchmarks.gpu_probe decode --out "$PARTS" --trace "$KIT/traces/deepseek-v2-lite-puffin-train.npz" \
  --layers "${DECODE_LAYERS:-8}" $DRY
# 6. torch ops and host syncs per MoE layer on the CUDA path (Qwen3-like routing, bf16 and fp32; the log has them)
if [ -z "$DRY" ]; then ops_device=cuda; else ops_device=cpu; fi
step torch_ops 60 bash -c "MOE_SERVE_CPU_KERNEL=0 python3 -m benchmarks.torch_ops --device $ops_device --dtype bfloat16 && MOE_SERVE_CPU_KERNEL=0 python3 -m benchmarks.torch_ops --device $ops_device"
# 7. hybrid miss handling over the real PCIe link: copy vs host vs auto (DeepSeek-V2-Lite and half-width Mixtral
#    geometry, 4 MoE layers, trace-replayed routing, cache fraction 0.25)
if [ -z "$DRY" ]; then hybrid=(--device cuda --links real --threads 8 --batches 1,16 --rounds 2); else hybrid=(--smoke); fi
step hybrid 150 bash -c "python3 -m benchmarks.hybrid_decode --json --trace '$KIT/traces/deepseek-v2-lite-puffin-train.npz' --mixtral-trace '$KIT/traces/mixtral-8x7b-humaneval-decode.jsonl' ${hybrid[*]} > '$PARTS/hybrid.json.tmp' && mv '$PARTS/hybrid.json.tmp' '$PARTS/hybrid.json'"
# 8. the server end to end on --device cuda (demo model, offloaded): chat completion, /metrics, SIGTERM
step serve 180 python3 -m benchmarks.gpu_probe serve --out "$PARTS" $DRY

python3 -m benchmarks.gpu_probe merge --out "$PARTS" --result "$OUT/gpu_validate.json" $DRY
echo "total ${SECONDS}s; result: $OUT/gpu_validate.json"
