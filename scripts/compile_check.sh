#!/usr/bin/env bash
# Compiles every fastrl Triton kernel for sm_90a and sm_80 on the CPU (no GPU needed), with the Triton the
# GPU machines run (3.6, installed on demand into .triton36, git-ignored, never into the venv) and with the
# venv's own (the newest). Fails on any compile error; prints registers, spills and shared memory per
# specialisation. See fastrl/triton_kernels/compile_check.py. Extra arguments go to the check (e.g. --quick).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}; [ "${FASTRL_VENV:-1}" != "0" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
GPU_TRITON=${FASTRL_GPU_TRITON:-3.6.0}
TARGET=.triton$(echo "${GPU_TRITON%.*}" | tr -d .)

if ! PYTHONPATH="$TARGET" "$PY" -c "import triton, sys; sys.exit(triton.__version__ != '$GPU_TRITON')" 2>/dev/null; then
  echo "[compile-check] installing triton==$GPU_TRITON into $TARGET"
  rm -rf "$TARGET"
  "$PY" -m pip install --disable-pip-version-check -q --no-deps --target "$TARGET" "triton==$GPU_TRITON"
fi

export TRITON_INTERPRET=0 TRITON_DEFAULT_FP_FUSION=1
status=0
for tp in "$TARGET" ""; do
  PYTHONPATH="$tp${tp:+:}$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m fastrl.triton_kernels.compile_check \
    --arch 90 --arch 80 "$@" || status=1
done
exit $status
