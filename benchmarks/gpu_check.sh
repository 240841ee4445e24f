#!/usr/bin/env bash
# The GPU check: on one CUDA GPU, in well under 8 minutes, everything CPU CI cannot run.
#
#   bash benchmarks/gpu_check.sh            # from the repository root, torch with CUDA installed
#
# 1. the CUDA-only tests (tests/test_cuda.py; skipped on CPU machines);
# 2. bench_dr_step.py at the papers' size (ResNet-32, CIFAR-shaped batch 100) in fp32 and bf16;
# 3. bench_nas_step.py at the papers' size (8 cells, C=16, batch 64, fd) in fp32 and bf16;
# 4. a 1-GPU torchrun (nccl) smoke of `lfm dr` and of `lfm search`.
# Each bench prints its own table (seconds per step, ratios, peak CUDA memory); the last table
# here says what passed and how long each part took. Everything goes to $LOG as well.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
LOG=${LOG:-${OUT:-/tmp}/gpu_check.log}
WORK=$(mktemp -d)
: >"$LOG"
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
  echo "gpu_check: no CUDA device visible to torch" | tee -a "$LOG"; exit 1; }
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" | tee -a "$LOG"

rows=()
part() {  # part NAME LIMIT_SECONDS COMMAND...: run it with a time limit, record the outcome
  local name=$1 limit=$2; shift 2
  echo "== $name: $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  rows+=("| $name | $([ "$rc" -eq 0 ] && echo ok || echo "FAILED (rc $rc)") | $((SECONDS - t0)) |")
}

part "CUDA-only tests" 120 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py
part "bench_dr_step fp32" 90 python3 benchmarks/bench_dr_step.py --device cuda --iters 5
part "bench_dr_step bf16" 90 python3 benchmarks/bench_dr_step.py --device cuda --iters 5 --precision bf16
part "bench_nas_step fp32" 90 python3 benchmarks/bench_nas_step.py --device cuda --backend fd --steps 3
part "bench_nas_step bf16" 90 python3 benchmarks/bench_nas_step.py --device cuda --backend fd --steps 3 --precision bf16
part "torchrun lfm dr (nccl, 1 GPU)" 60 torchrun --standalone --nproc_per_node 1 -m lfm dr \
  --dataset digits --epochs 1 --max-steps 20 --device cuda --no-progress --out "$WORK/dr"
part "torchrun lfm search (nccl, 1 GPU)" 60 torchrun --standalone --nproc_per_node 1 -m lfm search \
  --method lfm-darts --epochs 1 --steps-per-epoch 3 --device cuda --no-progress --out "$WORK/search"

{
  echo
  echo "| part | result | seconds |"
  echo "|---|---|---|"
  printf '%s\n' "${rows[@]}"
} | tee -a "$LOG"
rm -rf "$WORK"
