#!/usr/bin/env bash
# The main job: sets up the environment on a fresh machine, then runs `fastrl demo` (SFT, then GRPO, then
# DPO of a tiny locally-built model on a built-in task; CPU only, no downloads). Extra arguments go to it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
PY=python3; [ "${FASTRL_VENV:-1}" != "0" ] && PY=.venv/bin/python
exec "$PY" -m fastrl.cli demo "$@"
