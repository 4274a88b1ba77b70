#!/usr/bin/env bash
# The one script a session with a lent GPU runs, in a single device call of under 9 minutes:
#   here:   bench/gpu-wheels.sh                       (builds bench/wheels: what the GPU image lacks)
#   device: run command "bench/gpu.sh", carry ["bench/wheels"], timeout_s 560
# It installs the carried wheels, runs `pytest -m gpu` (tests/test_gpu.py), then
# `pretrain bench train --shape 1b` and `--shape wide`, and writes every log and JSON to $OUT.
# The table to put in bench/NOTES.md is printed last.
#
# `bench/gpu.sh --dry-run` runs the same steps on this machine's CPU (the GPU tests skip, the
# benchmark at the tiny shape): the suite runs it, so the script stays working between GPU sessions.
set -uo pipefail
cd "$(dirname "$0")/.."

dry_run=0
[ "${1:-}" = "--dry-run" ] && dry_run=1
if [ "$dry_run" = 1 ]; then
    PY=${PY:-.venv/bin/python}
    OUT=${OUT:-runs/gpu-dry-run}
    WORK=${WORK:-$OUT/work}
    shapes=(tiny); bench_steps=(--warmup 1 --steps 2); limits=(300 600)
else
    PY=${PY:-python3}
    OUT=${OUT:?set by the device tool; outside it, OUT=folder bench/gpu.sh}
    WORK=${WORK:-/tmp/bench-train}  # tokenizer, shards and logs, kept out of what comes back
    shapes=(1b wide); bench_steps=(--warmup 4 --steps 8); limits=(270 150)
    export TORCH_CUDA_ARCH_LIST=9.0  # the image's 9.0a crashes DeepSpeed's op builder
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site bench/wheels/*.whl \
        || { echo "installing bench/wheels failed: build them with bench/gpu-wheels.sh and carry bench/wheels"; exit 2; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p "$OUT"

{
    date -u +%Y-%m-%dT%H:%MZ
    git rev-parse --short HEAD 2>/dev/null
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PY" -c 'import sys, torch, deepspeed, megatron.core, transformers
print(f"python {sys.version.split()[0]} torch {torch.__version__} deepspeed {deepspeed.__version__} "
      f"megatron-core {megatron.core.__version__} transformers {transformers.__version__}")'
} > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

failures=0
summary=()
run_step() {  # run_step NAME SECONDS LOG COMMAND...: a failed or timed-out step does not stop the others
    local name=$1 seconds=$2 log=$3; shift 3
    timeout "$seconds" "$@" > "$log" 2>&1
    local code=$?
    summary+=("$name: exit $code$([ "$code" = 124 ] && echo " (timed out after $seconds s)")")
    [ "$code" = 0 ] || failures=$((failures + 1))
}

run_step "pytest -m gpu" "${limits[0]}" "$OUT/gpu-tests.log" "$PY" -m pytest -m gpu -v -p no:cacheprovider tests/test_gpu.py
tail -n 15 "$OUT/gpu-tests.log"
for shape in "${shapes[@]}"; do
    run_step "bench --shape $shape" "${limits[1]}" "$OUT/bench-$shape.log" "$PY" -m pretrain bench train \
        --shape "$shape" "${bench_steps[@]}" --work "$WORK" --out "$OUT/bench-$shape.json"
done

echo
printf '%s\n' "${summary[@]}"
for shape in "${shapes[@]}"; do
    [ -f "$OUT/bench-$shape.json" ] && "$PY" -c 'import json, sys
from pretrain.bench.train import print_table
print_table(json.load(open(sys.argv[1])))' "$OUT/bench-$shape.json"
done
exit $((failures > 0))
