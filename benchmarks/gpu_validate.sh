#!/usr/bin/env bash
# One command for the day a GPU is lent (H100/H200), from the repository root:
#
#     bash benchmarks/gpu_validate.sh [--bench]
#
# It builds fastrobust._C in place with the torch and triton the machine has (the host C++
# compiler; no install, no nvcc, no network), then:
#   memory_order  the static check of every Triton kernel (benchmarks/memory_order_check.py)
#   in parallel:
#   tests         the suite on CPU tensors (Triton under the interpreter; not the `slow` ones)
#   gpu_tests     every CUDA test with the compiled kernels (TRITON_INTERPRET=0): the training
#                 shapes of tests/test_gpu_correctness.py (each call three times, bitwise; no
#                 Python frame inside a replayed call) and tests/test_devices.py
#   memcheck, initcheck, racecheck
#                 compute-sanitizer on benchmarks/gpu_sanitize_calls.py: every kernel, each call
#                 recorded then replayed from C++ (csrc/launch/plans.cpp); any report fails the step
#   launch_counts launches per op
#   --bench: ops (benchmarks/gpu_ops.py) and train_step (benchmarks/gpu_train_step.py)
# A failing step is recorded and the script goes on, so one run shows everything; the exit code
# is 1 if any step failed. The summary goes to benchmarks/results/gpu-<gpu>-<date>.md and, with
# the logs (logs.tar.gz) and the benchmark JSON, to $OUT (default benchmarks/results/gpu-run).
# About 5 minutes on an H200 without --bench. DEADLINE (seconds, default 480) caps the whole
# run: each step's time limit is cut to what is left, so the summary is always written.
set -uo pipefail
cd "$(dirname "$0")/.."
BENCH=0
[ "${1:-}" = "--bench" ] && BENCH=1
OUT=${OUT:-benchmarks/results/gpu-run}
LOGS="$OUT/logs"
mkdir -p "$LOGS"
PY=${PYTHON:-python3}
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' ' '-')
gpu=$(printf '%s' "${gpu:-unknown-gpu}" | tr -c 'A-Za-z0-9._-' '-')
summary="benchmarks/results/gpu-${gpu}-$(date +%F).md"
failed=0
t_start=$SECONDS

DEADLINE=${DEADLINE:-480}  # seconds: every step's limit is cut to what is left of it
budget() {  # budget LIMIT: LIMIT, or the seconds left before the deadline if fewer
  local left=$((DEADLINE - (SECONDS - t_start)))
  echo $(( left < $1 ? left : $1 ))
}
step() {  # step NAME TIMEOUT_S CMD...: runs CMD, logs, records pass/fail and seconds
  local name=$1 limit; limit=$(budget "$2"); shift 2
  if [ "$limit" -lt 5 ]; then record "$name" skipped 0; return; fi
  local t0=$SECONDS
  timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
  record "$name" $? $((SECONDS - t0))
}
bgstep() {  # bgstep NAME TIMEOUT_S CMD...: step in the background; `finish NAME` records it
  local name=$1 limit; limit=$(budget "$2"); shift 2
  ( local t0=$SECONDS
    timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
    echo "$? $((SECONDS - t0))" > "$LOGS/$name.rc" ) &
}
finish() {
  local rc=1 secs=0
  [ -f "$LOGS/$1.rc" ] && read -r rc secs < "$LOGS/$1.rc"
  record "$1" "$rc" "$secs"
}
record() {  # record NAME RC SECONDS
  local result="ok"
  if [ "$2" = skipped ]; then result="skipped (deadline)"; failed=1
  elif [ "$2" -ne 0 ]; then result="FAILED (rc $2)"; failed=1; fi
  local last
  last=$(grep -E "passed|failed|ERROR SUMMARY|error|kernels checked|launched" \
         "$LOGS/$1.log" 2>/dev/null | tail -n 1 | tr '|' '/' | cut -c1-120)
  echo "| $1 | $result | $3 s | ${last:-} |" >> "$summary"
  echo "[$(($SECONDS - t_start)) s] $1: $result ($3 s) ${last:-}"
}

{
  echo "# GPU validation: $gpu, $(date +%F)"
  echo
  echo "- $($PY -c "import torch, triton; print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}')")"
  echo "- $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader)"
  echo "- commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
  echo
  echo "| step | result | time | last line |"
  echo "|---|---|---|---|"
} > "$summary"

step build 300 env MAX_JOBS=$(( $(nproc) > 2 ? $(nproc) - 2 : 1 )) \
  $PY setup.py build_ext --inplace
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
step info 60 $PY -m fastrobust info
step memory_order 60 $PY benchmarks/memory_order_check.py

# In parallel (16 cores, one GPU): the CPU suite (interpreter; the CUDA cases skip themselves
# there; the two `slow` trainer tests, 6 min on one worker, are left to CI), the CUDA tests
# with the compiled kernels, and the three sanitizers.
bgstep tests 420 env TRITON_INTERPRET=1 $PY -m pytest -q -n 8 -p no:cacheprovider -m "not slow"
bgstep gpu_tests 420 env TRITON_INTERPRET=0 $PY -m pytest -q -n 4 -p no:cacheprovider \
  tests/test_gpu_correctness.py tests/test_devices.py
for tool in memcheck initcheck racecheck; do
  bgstep "$tool" 300 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 TRITON_INTERPRET=0 \
    compute-sanitizer --tool "$tool" --error-exitcode 1 $PY benchmarks/gpu_sanitize_calls.py
done
wait
for name in tests gpu_tests memcheck initcheck racecheck; do finish "$name"; done
step launch_counts 60 $PY benchmarks/launch_counts.py

if [ "$BENCH" = 1 ]; then
  step ops 240 $PY benchmarks/gpu_ops.py --json "$OUT/ops.json"
  step train_step 420 $PY benchmarks/gpu_train_step.py --json "$OUT/train_step.json"
fi

{
  echo
  echo "Total $((SECONDS - t_start)) s. Failures and errors:"
  echo
  echo '```'
  grep -hE "^(FAILED|ERROR)|= .*(failed|error)" "$LOGS/tests.log" "$LOGS/gpu_tests.log" \
    2>/dev/null | head -n 40
  grep -h "ERROR SUMMARY" "$LOGS"/memcheck.log "$LOGS"/initcheck.log "$LOGS"/racecheck.log \
    2>/dev/null
  echo '```'
  for b in ops train_step; do
    if [ -f "$LOGS/$b.log" ]; then
      echo
      echo "### $b"
      echo
      sed -n '/^|/p' "$LOGS/$b.log"
    fi
  done
  echo
  echo "Launch counts:"
  echo
  echo '```'
  cat "$LOGS/launch_counts.log"
  echo '```'
} >> "$summary"
cp "$summary" "$OUT/summary.md"
tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -rf "$LOGS"
echo "wrote $summary (total $((SECONDS - t_start)) s)"
exit $failed
