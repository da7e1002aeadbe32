#!/usr/bin/env bash
# Every suite on the CPU at small shapes (about a minute on 2 cores); extra arguments go to fastrl bench.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m fastrl.bench --out "${OUT:-bench_results/cpu}" "$@"
