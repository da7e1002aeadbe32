#!/usr/bin/env bash
# The one prepared check for a lent H100/H200 (torch + Triton preinstalled, no internet). It fits one
# 10-minute device command: every step gets at most its own cap and what is left of FASTRL_GPU_BUDGET_S
# (default 540 s), in order of importance, and writes its results as it goes:
#   1. environment report; peers (liger-kernel, cut-cross-entropy, trl) from .whl/*.whl when that folder
#      travelled with the tree (installed --no-deps into /tmp/site, put on PYTHONPATH);
#   2. fastrl installed editable (falls back to build_ext --inplace, then to the source tree on PYTHONPATH);
#   3. the GPU tests: pytest -m gpu (kernels, CUDA-graph decode, CUDA-IPC sync, activation offload);
#   4. with FASTRL_GPU_GRPO_STEP=1, the whole-GRPO-step benchmark against TRL (0.5B, 2x8, 64+256);
#   5. the weight-sync check: CUDA-IPC buckets into a receiver process vs a device copy (1.5B, 7B sets);
#   6. the generate benchmark (hf engine vs transformers generate, 0.5B; FASTRL_GPU_GENERATE=0 skips it);
#   7. the kernel benchmark at ANCHORS.md's shapes: python -m fastrl.bench --gpu --out $OUT/bench
#      (results.json/.md are rewritten after every case, so a run cut short keeps what it measured);
#   8. the results tables printed LAST.
# Usage: OUT=/some/dir bash benchmarks/gpu_check.sh [extra fastrl bench args]   (OUT defaults to ./gpu_out)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
T0=$SECONDS
BUDGET=${FASTRL_GPU_BUDGET_S:-540}
log() { echo "[gpu_check +$((SECONDS - T0))s] $*"; }
# cap SECONDS -> the timeout of the next step: its cap, or what is left of the budget (10 s kept back)
cap() { local left=$((BUDGET - (SECONDS - T0) - 10)); [ "$left" -lt "$1" ] && echo $((left > 5 ? left : 5)) || echo "$1"; }

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
timeout "$(cap 150)" "$PY" -m pytest -m gpu -x -q -p no:cacheprovider --durations=10 2>&1 | tail -40 | tee "$OUT/pytest_gpu.log"
log "pytest status: ${PIPESTATUS[0]}"

if [ "${FASTRL_GPU_GRPO_STEP:-0}" = "1" ]; then
  # The whole GRPO step: fastrl vs TRL (and TRL + Liger) on the 0.5B Qwen2-architecture setup, each method
  # in its own process, 4 steps each. TRL must travel in .whl/ (no network there).
  log "grpo_step --gpu"
  timeout "$(cap 200)" "$PY" -m fastrl.bench.grpo_step --gpu --out "$OUT/grpo_step" >"$OUT/grpo_step.log" 2>&1
  log "grpo_step status: $?"
  tail -15 "$OUT/grpo_step.log"
fi

log "weight sync: CUDA-IPC buckets vs device copy"
timeout "$(cap 120)" "$PY" benchmarks/gpu_sync_check.py --out "$OUT/sync" --repeats 3 --warmup 1 >"$OUT/sync.log" 2>&1
log "sync status: $? (1: a failed method or checksum; 2: no CUDA)"
tail -12 "$OUT/sync.log"

if [ "${FASTRL_GPU_GENERATE:-1}" = "1" ]; then
  log "fastrl bench --gpu --suite generate"
  timeout "$(cap 120)" "$PY" -m fastrl.bench --gpu --suite generate --out "$OUT/generate" --no-progress \
    --repeats 3 --warmup 1 >"$OUT/generate.log" 2>&1
  log "generate status: $?"
fi

log "fastrl bench --gpu"
timeout "$(cap 330)" "$PY" -m fastrl.bench --gpu --out "$OUT/bench" --no-progress --repeats 5 --warmup 2 \
  --suite grpo dpo logprobs linear_logprobs native "$@" >"$OUT/bench.log" 2>&1
status=$?
log "bench status: $status (124 = cut by the timeout; results up to the last finished case are kept)"
grep -iE "error|warning" "$OUT/bench.log" | grep -v "^|" | head -10 || true

echo
echo "===================== results ($((SECONDS - T0)) s) ====================="
[ -f "$OUT/generate/results.md" ] && cat "$OUT/generate/results.md"
[ -f "$OUT/sync/sync.md" ] && cat "$OUT/sync/sync.md"
if [ -f "$OUT/bench/results.md" ]; then
  cat "$OUT/bench/results.md"
else
  tail -30 "$OUT/bench.log"
fi
