#!/usr/bin/env bash
# One call on a lent GPU (the device tool): environment, the kernel tests at full size, then
# benchmarks. Logs and JSON go to $OUT (bench/results without it).
#
#   bash bench/gpu_run.sh kernels    # tests/kernels + dequantize + 4-bit matmul
#   bash bench/gpu_run.sh matmul     # the 4-bit matmul alone
#   bash bench/gpu_run.sh train      # QLoRA training step, Llama-3-8B shapes
#   bash bench/gpu_run.sh profile    # where the training step's GPU time goes, both sides
#   bash bench/gpu_run.sh decode     # decode at batch 1, same model
#   bash bench/gpu_run.sh final      # quick checks + train + decode in one call
#   bash bench/gpu_run.sh moe        # QLoRA on a Mixtral-shaped MoE (4-bit experts) against the peer (16-bit experts)
#
# Peers not in the machine's image travel in .gpu/site (carry it; git-ignored): bitsandbytes
# 0.50.2 (its cuda130 library only: the whole wheel is 43 MB) and gguf, from their PyPI wheels:
#   echo /.gpu/ >> .git/info/exclude
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_24_x86_64 -d /tmp/whl bitsandbytes==0.50.2 gguf==0.19.0
#   mkdir -p .gpu/site && (cd .gpu/site && for w in /tmp/whl/*.whl; do unzip -q "$w"; done)
#   find .gpu/site/bitsandbytes -name 'libbitsandbytes_*.so' ! -name '*cuda130*' -delete
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src:$PWD/.gpu/site" PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
part=${1:-kernels}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
python3 - <<'PY'
import importlib.metadata as md, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())
for name in ["triton", "transformers", "peft", "bitsandbytes", "accelerate"]:
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "missing")
PY

run() {  # run NAME CMD...: log to $OUT/NAME.log, keep going on failure
    local name=$1; shift
    echo "=== $name: $*"
    local t0=$SECONDS
    "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
}

case $part in
kernels)
    run tests python3 -m pytest -q -x -p no:cacheprovider tests/kernels tests/nn/test_linear4bit.py
    run dequantize python3 bench/bench_dequantize.py --device cuda --sweep
    run matmul python3 bench/bench_matmul_4bit.py
    ;;
matmul)
    run matmul python3 bench/bench_matmul_4bit.py
    ;;
train)  # builds the Llama-3-8B-shaped model folder in /tmp first (reused while the machine is warm)
    run train python3 bench/bench_train_step_gpu.py --time-budget 420
    ;;
profile)
    run profile-ours python3 bench/profile_train_step_gpu.py --side ours
    run profile-peer python3 bench/profile_train_step_gpu.py --side peer
    ;;
final)  # after changes to the training/decode path: quick GPU checks, then both model benchmarks
    run tests python3 -m pytest -q -x -p no:cacheprovider tests/kernels/test_qlora_linear.py tests/nn/test_linear4bit.py -k "cuda or fused"
    run train python3 bench/bench_train_step_gpu.py --time-budget 200
    run decode python3 bench/bench_decode_gpu.py --new-tokens 64 --time-budget 300
    ;;
decode)
    run decode python3 bench/bench_decode_gpu.py --new-tokens 64 --time-budget 450
    ;;
session3)  # decode with fourbit's own compiled greedy loop, profiled; then the compiled training step
    run decode python3 bench/bench_decode_gpu.py --variants bnb-eager,fourbit-compile,fourbit-graph --new-tokens 64 \
        --profile --time-budget 250
    run train python3 bench/bench_train_step_gpu.py --compile --time-budget 290
    ;;
moe)
    run moe python3 bench/bench_train_step_gpu.py --moe --steps 4 --warmup 1 --time-budget 300
    ;;
train-compile)  # the training step with each decoder layer compiled, against the peer
    run train python3 bench/bench_train_step_gpu.py --compile --time-budget 330
    ;;
*)
    echo "unknown part: $part"; exit 2 ;;
esac
