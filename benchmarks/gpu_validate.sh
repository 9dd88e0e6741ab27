#!/usr/bin/env bash
# One command for the day a GPU is lent (H100/H200): build with the CUDA toolkit, the whole
# test suite, compute-sanitizer on a few calls, the launch counts, the benchmarks, and one
# results file benchmarks/results/gpu-<gpu>-<date>.md. Run from the repository root:
#
#     bash benchmarks/gpu_validate.sh
#
# Each step's output goes to $OUT (default benchmarks/results/gpu-run/) and the summary file;
# a failing step is recorded and the script goes on, so one run shows everything.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-run}
mkdir -p "$OUT"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' ' '-')
gpu=${gpu:-unknown-gpu}
summary="benchmarks/results/gpu-${gpu}-$(date +%F).md"
step() {  # step NAME TIMEOUT_S CMD...: runs CMD, logs, records pass/fail and seconds
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "| $name | $([ $rc -eq 0 ] && echo ok || echo "FAILED (rc $rc)") | $((SECONDS - t0)) s |" \
    >> "$summary"
  tail -n 3 "$OUT/$name.log"
}
{
  echo "# GPU validation: $gpu, $(date +%F)"
  echo
  python -c "import torch, triton; print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}')"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  echo
  echo "| step | result | time |"
  echo "|---|---|---|"
} > "$summary"

step build 300 python -m pip install -q --no-build-isolation -e ".[test,bench,gpu]"
step info 60 fastrobust info
# The suite as in CI (Triton under the interpreter for the CPU-tensor backend tests), one
# worker per core; then every op on CUDA tensors with the compiled kernels
# (tests/test_devices.py's cuda cases, TRITON_INTERPRET=0).
step tests 240 python -m pytest -q -x -n auto --maxprocesses=8 -p no:cacheprovider
step devices 180 env TRITON_INTERPRET=0 python -m pytest -q -p no:cacheprovider tests/test_devices.py
step launch_counts 60 python benchmarks/launch_counts.py
cat > "$OUT/sanitize_calls.py" <<'PY'
import torch
from fastrobust import functional as F
x = torch.randn(8, 16, 8, 8, device="cuda", requires_grad=True)
w = torch.randn(3, 16, device="cuda", requires_grad=True)
b = torch.zeros(3, 16, device="cuda", requires_grad=True)
s = torch.rand(8, 16, device="cuda", requires_grad=True)
rm, rv = torch.zeros(3, 16, device="cuda"), torch.ones(3, 16, device="cuda")
br = torch.randint(0, 3, (8,), device="cuda")
y = F.multi_batch_norm(x, br, w, b, rm, rv, training=True, input_scale=s, film_gamma=s,
                       film_beta=s, activation="relu")
y.sum().backward()
mix = torch.rand(8, 3, device="cuda", requires_grad=True)
F.mixed_batch_norm(x, mix, w, b, rm, rv, training=True).sum().backward()
F.film(x, s, s).sum().backward()
xa, g, xn = (torch.rand(8, 3, 32, 32, device="cuda") for _ in range(3))
for norm in ("linf", "l2"):
    F.pgd_step_(xa, g, xn, 8 / 255, 2 / 255, norm=norm)
F.mifgsm_step_(xa, g, torch.zeros_like(xa), xn, 8 / 255, 2 / 255)
torch.cuda.synchronize()
print("ok")
PY
step memcheck 120 compute-sanitizer --tool memcheck python "$OUT/sanitize_calls.py"
step racecheck 120 compute-sanitizer --tool racecheck python "$OUT/sanitize_calls.py"
# The CUDA C++ kernels (backend "cuda", selectable): against Triton, then under the sanitizer.
step cuda_vs_triton 120 python benchmarks/gpu_cuda_vs_triton.py
step cuda_memcheck 120 compute-sanitizer --tool memcheck python benchmarks/gpu_cuda_vs_triton.py --sanitize
for fam in multi_bn mixed_bn film pgd train_step; do
  step "bench_$fam" 120 python -m pytest -q -p no:cacheprovider "benchmarks/bench_$fam.py" \
    --benchmark-json "$OUT/bench_$fam.json"
done
{
  echo
  echo "Logs and pytest-benchmark JSON in $OUT/. Launch counts:"
  echo
  echo '```'
  cat "$OUT/launch_counts.log"
  echo '```'
} >> "$summary"
echo "wrote $summary"
