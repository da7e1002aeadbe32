#!/usr/bin/env bash
# The one prepared check for a lent H100/H200 (torch + Triton preinstalled, no internet). About 8 minutes:
#   1. environment report; peers (liger-kernel, cut-cross-entropy, trl) from .whl/*.whl when that folder
#      travelled with the tree (installed --no-deps into /tmp/site, put on PYTHONPATH);
#   2. fastrl installed editable (falls back to build_ext --inplace, then to the source tree on PYTHONPATH);
#   3. the GPU tests: pytest -m gpu;
#   4. the benchmark at ANCHORS.md's shapes: python -m fastrl.bench --gpu --out $OUT/bench
#      (results.json/.md are rewritten after every case, so a run cut short keeps what it measured);
#   5. with FASTRL_GPU_GRPO_STEP=1, the whole-GRPO-step benchmark against TRL (about 4 more minutes);
#   6. the results table printed LAST.
# Usage: OUT=/some/dir bash benchmarks/gpu_check.sh [extra fastrl bench args]   (OUT defaults to ./gpu_out)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
T0=$SECONDS
log() { echo "[gpu_check +$((SECONDS - T0))s] $*"; }

log "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
"$PY" - <<'PY'
import platform, torch
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = None
print(f"python {platform.python_version()} torch {torch.__version__} cuda {torch.version.cuda} triton {tv}")
print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA DEVICE")
PY

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
  log "installing peer wheels: $(ls .whl/*.whl | xargs -n1 basename | tr '\n' ' ')"
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl; then
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
  else
    log "peer wheels failed to install: peers will be reported as skipped"
  fi
else
  log "no .whl/ folder: Liger / Cut Cross-Entropy rows will read 'skipped'"
fi

log "installing fastrl"
if ! "$PY" -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1; then
  log "editable install failed (see install.log); trying build_ext --inplace"
  "$PY" setup.py build_ext --inplace >>"$OUT/install.log" 2>&1 || log "no native extension: Python fallback"
fi
"$PY" -c "import fastrl, fastrl.native as n; print('fastrl', fastrl.__version__, 'native', n.HAS_NATIVE)" \
  || log "fastrl does not import"

log "pytest -m gpu"
timeout 180 "$PY" -m pytest -m gpu -x -q -p no:cacheprovider --durations=10 2>&1 | tail -40 | tee "$OUT/pytest_gpu.log"
log "pytest status: ${PIPESTATUS[0]}"

log "fastrl bench --gpu"
timeout 330 "$PY" -m fastrl.bench --gpu --out "$OUT/bench" --no-progress --repeats 5 --warmup 2 \
  --suite grpo dpo logprobs linear_logprobs native "$@" >"$OUT/bench.log" 2>&1
status=$?
log "bench status: $status (124 = cut by the timeout; results up to the last finished case are kept)"
grep -iE "error|warning" "$OUT/bench.log" | grep -v "^|" | head -10 || true

if [ "${FASTRL_GPU_GRPO_STEP:-0}" = "1" ]; then
  # The whole GRPO step (issue 4): fastrl vs TRL (and TRL + Liger) on the 0.5B Qwen2-architecture setup,
  # each method in its own process, 4 steps each. TRL must travel in .whl/ (no network there).
  log "grpo_step --gpu"
  timeout 240 "$PY" -m fastrl.bench.grpo_step --gpu --out "$OUT/grpo_step" >"$OUT/grpo_step.log" 2>&1
  log "grpo_step status: $?"
  tail -15 "$OUT/grpo_step.log"
fi

echo
echo "===================== results ($((SECONDS - T0)) s) ====================="
if [ -f "$OUT/bench/results.md" ]; then
  cat "$OUT/bench/results.md"
else
  tail -30 "$OUT/bench.log"
fi
