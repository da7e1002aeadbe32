#!/usr/bin/env bash
# The test command: sets up the environment on a fresh machine, then runs the whole suite on the CPU
# (Triton kernels under the interpreter). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
PY=python3; [ "${FASTRL_VENV:-1}" != "0" ] && PY=.venv/bin/python
"$PY" -m ruff check --quiet . && echo "[test] ruff: clean"
exec "$PY" -m pytest -n "${FASTRL_TEST_WORKERS:-2}" -q --durations=15 "$@"
