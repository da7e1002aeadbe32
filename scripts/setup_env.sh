#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment in .venv and installs fastrl into it, editable, with
# the extras named in $FASTRL_EXTRAS (default "test"). Idempotent: a second run only checks.
#
# torch: the CPU build 2.13.0 unless torch is already importable in the venv. Set FASTRL_TORCH_SPEC to
# another requirement (e.g. "torch==2.11.0") to choose; set FASTRL_VENV=0 to install into the current
# interpreter instead of .venv (a GPU box with its own torch).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
EXTRAS=${FASTRL_EXTRAS:-test}
TORCH_SPEC=${FASTRL_TORCH_SPEC:-torch==2.13.0}

if [ "${FASTRL_VENV:-1}" != "0" ]; then
  if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv"
    "$PY" -m venv .venv
  fi
  PY=.venv/bin/python
fi

pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing $TORCH_SPEC"
  pip_install "$TORCH_SPEC"
fi

sources_sum=$( (cat setup.py pyproject.toml csrc/* 2>/dev/null || true) | cksum | cut -d' ' -f1)
stamp=.venv/.fastrl-installed-$sources_sum-$EXTRAS
if [ "${FASTRL_VENV:-1}" = "0" ] || [ ! -f "$stamp" ]; then
  echo "[setup] installing fastrl[$EXTRAS] (editable; builds fastrl._C)"
  pip_install -e ".[$EXTRAS]"
  if [ "${FASTRL_VENV:-1}" != "0" ]; then rm -f .venv/.fastrl-installed-*; touch "$stamp"; fi
fi
"$PY" -c "import fastrl, fastrl.native as n; print(f'[setup] fastrl {fastrl.__version__} ready; native extension: {n.HAS_NATIVE}')"
