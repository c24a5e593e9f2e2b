#!/usr/bin/env bash
# Creates .venv and installs PyTorch (CPU build unless an NVIDIA GPU is present) and requirements.txt.
# Inside an active virtual environment (VIRTUAL_ENV set, as when Transformer Lab installs the plugin into the
# venv it made for it) it installs into that one instead and creates nothing; a PyTorch already there is kept.
# --with-transformerlab also installs Transformer Lab's SDK (the `transformerlab` package, AGPL-3.0; about 180 MB
# with what it needs), which a run launched by the app reports through; task.yaml's setup asks for it. An SDK
# already installed (the app's own) is kept.
# Idempotent: when everything is already installed at the pinned versions it returns at once.
set -euo pipefail
cd "$(dirname "$0")"

WITH_TRANSFORMERLAB=0
for arg in "$@"; do
  case "$arg" in
    --with-transformerlab) WITH_TRANSFORMERLAB=1 ;;
    *) echo "setup.sh: unknown option '$arg' (the only option is --with-transformerlab)" >&2; exit 2 ;;
  esac
done
TRANSFORMERLAB_VERSION=0.1.46

PYTHON=${PYTHON:-python3}
VENV=.venv
if [ -n "${VIRTUAL_ENV:-}" ] && [ "$(realpath "$VIRTUAL_ENV")" != "$(realpath -m .venv)" ]; then
  VENV="$VIRTUAL_ENV"
fi
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
STAMP="$VENV/.setup-stamp"
WANT="$( (cat requirements.txt setup.sh; echo "$WITH_TRANSFORMERLAB") | sha256sum | cut -d' ' -f1)"

# find_spec locates the packages without importing them (importing torch and diffusers takes seconds).
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && "$VENV/bin/python" -c \
  "import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in ('torch', 'diffusers', 'peft')))" 2>/dev/null; then
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# venvs made by uv (Transformer Lab's) have no pip: uv installs into them, or pip is bootstrapped.
if "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
  PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
elif command -v uv >/dev/null 2>&1; then
  PIP=(uv pip install --quiet --python "$VENV/bin/python")
else
  "$VENV/bin/python" -m ensurepip --upgrade >/dev/null
  PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
fi

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; }

# torch first and pinned, so nothing below pulls a different (multi-GB) build. Where a CPU wheel of this
# version is provided locally pip takes it; elsewhere pip's index decides.
"$VENV/bin/python" -c "import torch" 2>/dev/null || "${PIP[@]}" "torch==$TORCH_VERSION"
"${PIP[@]}" -r requirements.txt
if [ "$WITH_TRANSFORMERLAB" = 1 ] && ! "$VENV/bin/python" -c "import importlib.metadata as m; m.version('transformerlab')" 2>/dev/null; then
  "${PIP[@]}" "transformerlab==$TRANSFORMERLAB_VERSION"
fi

# xFormers is CUDA-only and its wheels pin their own torch: install it without dependencies where a GPU is
# present, keep it only if it imports against our torch. The trainer falls back to PyTorch SDPA without it.
if has_gpu && ! "$VENV/bin/python" -c "import xformers.ops" 2>/dev/null; then
  "${PIP[@]}" --no-deps xformers && "$VENV/bin/python" -c "import xformers.ops" 2>/dev/null \
    || { "$VENV/bin/python" -m pip uninstall -y -q xformers 2>/dev/null; echo "setup: xFormers unusable here; PyTorch SDPA will be used"; }
fi

# bitsandbytes (base_quantization nf4, optimizer adamw_8bit) is CUDA-only: installed where a GPU is present,
# without dependencies so that it cannot replace our torch. Without it those two settings are refused.
if has_gpu && ! "$VENV/bin/python" -c "import bitsandbytes" 2>/dev/null; then
  "${PIP[@]}" --no-deps bitsandbytes || echo "setup: bitsandbytes unavailable; base_quantization nf4 and optimizer adamw_8bit will be refused"
fi

echo "$WANT" > "$STAMP"
echo "setup: ready ($("$VENV/bin/python" -c 'import torch, diffusers; print("torch", torch.__version__, "diffusers", diffusers.__version__)'))"
