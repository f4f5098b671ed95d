#!/usr/bin/env bash
# One call on a lent GPU (the device tool): environment, the kernel tests at full size, then
# benchmarks. Logs and JSON go to $OUT (bench/results without it).
#
#   bash bench/gpu_run.sh kernels    # tests/kernels + dequantize + 4-bit matmul (with --sweep)
#   bash bench/gpu_run.sh matmul     # the 4-bit matmul alone
#   bash bench/gpu_run.sh train      # QLoRA training step, Llama-3-8B shapes
#   bash bench/gpu_run.sh profile    # where the training step's GPU time goes, both sides
#   bash bench/gpu_run.sh decode     # decode at batch 1, same model
#   bash bench/gpu_run.sh final      # quick checks + train + decode in one call
#   bash bench/gpu_run.sh session4   # next: the new 4-bit matmul options swept at M = 1 and 16
#   GEMV=... bash bench/gpu_run.sh session4-decode   # then decode with the sweep's best M = 1 shape
#   bash bench/gpu_run.sh session5   # session4 + its decode in one call, and QLoRA on a Mixtral-shaped MoE
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
    run matmul python3 bench/bench_matmul_4bit.py --sweep
    ;;
matmul)
    run matmul python3 bench/bench_matmul_4bit.py --sweep
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
decode-variants)  # session 2: the default M = 1 launch shape and an alternative, each profiled
    run decode-default python3 bench/bench_decode_gpu.py --variants bnb-eager,fourbit-compile --new-tokens 64 \
        --profile --time-budget 200
    mv "$OUT/decode-gpu.json" "$OUT/decode-default.json"
    run decode-alt python3 bench/bench_decode_gpu.py --variants fourbit-compile --new-tokens 64 --profile \
        --gemv "${GEMV:-64,4,4,auto,shared,prefetch,words}" --time-budget 170
    mv "$OUT/decode-gpu.json" "$OUT/decode-alt.json"
    ;;
session2)  # M = 1 kernel variants (pair table, per-block scale), then decode profiled
    run tests python3 -m pytest -q -x -p no:cacheprovider tests/kernels/test_triton_matmul_4bit.py
    run matmul python3 bench/bench_matmul_4bit.py --rows 1 --sweep
    bash "$0" decode-variants
    ;;
session3)  # decode with fourbit's own compiled greedy loop, profiled; then the compiled training step
    run decode python3 bench/bench_decode_gpu.py --variants bnb-eager,fourbit-compile,fourbit-graph --new-tokens 64 \
        --profile --time-budget 250
    run train python3 bench/bench_train_step_gpu.py --compile --time-budget 290
    ;;
session4)  # the options counted by tools/inspect_sass.py (shared table, prefetch, words), timed at M = 1 and 16
    run tests python3 -m pytest -q -x -p no:cacheprovider tests/kernels/test_triton_matmul_4bit.py
    run matmul python3 bench/bench_matmul_4bit.py --rows 1,16 --sweep
    ;;
session4-decode)  # then decode with GraphDecoder: the default M = 1 launch shape, and $GEMV (the sweep's best)
    run decode-default python3 bench/bench_decode_gpu.py --variants bnb-eager,fourbit-graph --new-tokens 64 \
        --time-budget 280
    mv "$OUT/decode-gpu.json" "$OUT/decode-default.json"
    run decode-alt python3 bench/bench_decode_gpu.py --variants fourbit-graph --new-tokens 64 \
        --gemv "${GEMV:-64,4,4,auto,shared,prefetch,words}" --time-budget 200
    mv "$OUT/decode-gpu.json" "$OUT/decode-alt.json"
    ;;
session5)  # one ~9-minute call: the M = 1 / 16 sweep, the MoE QLoRA step against the peer, then decode
    # with the default M = 1 launch shape and with the sweep's best (each piece bounded, in that order)
    run matmul timeout 150 python3 bench/bench_matmul_4bit.py --rows 1,16 --sweep --repeats 20
    gemv=$(python3 bench/bench_matmul_4bit.py --pick-gemv "$OUT/matmul-4bit.json" 2>/dev/null | tail -n 1)
    echo "=== the sweep's best M = 1 launch shape: ${gemv:-none}"
    run moe python3 bench/bench_train_step_gpu.py --moe --steps 4 --warmup 1 --time-budget 150 --child-timeout 90
    run decode-default python3 bench/bench_decode_gpu.py --variants bnb-eager,fourbit-graph --new-tokens 64 \
        --time-budget 170
    mv "$OUT/decode-gpu.json" "$OUT/decode-default.json"
    if [ -n "$gemv" ]; then
        run decode-alt python3 bench/bench_decode_gpu.py --variants fourbit-graph --new-tokens 64 --gemv "$gemv" \
            --time-budget 90
        mv "$OUT/decode-gpu.json" "$OUT/decode-alt.json"
    fi
    ;;
train-compile)  # the training step with each decoder layer compiled, against the peer
    run train python3 bench/bench_train_step_gpu.py --compile --time-budget 330
    ;;
*)
    echo "unknown part: $part"; exit 2 ;;
esac
