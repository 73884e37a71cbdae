#!/usr/bin/env bash
# The head-to-head where the paper's premise holds (issue 31), on a lent GPU in one call of at most ~9 minutes
# (BUDGET seconds, default 500): the step and epoch costs of every method (benchmarks/train_step.py), then the
# experiments configs/experiments/premise_peers_*.yaml (HRP, Base, CE and the comparison methods; MNIST regime,
# sym80 and sym50, seeds 0-2) and the paired intervention of premise_mechanism.yaml (issue 32) as concurrent sweeps
# sharing the GPU, until the budget; results in $OUT.
#   bash benchmarks/gpu_premise.sh [EXPERIMENT.yaml...]   (default: premise_peers_*.yaml and premise_mechanism.yaml)
# Needs data/mnist_premise and data/cifar10_gray_test (benchmarks/prepare_data.py; carry them to the machine).
set -u
HERE=$(cd "$(dirname "$0")/.." && pwd)
BUDGET=${BUDGET:-500}
OUT=${OUT:-$PWD/gpu_out}
JOBS=${JOBS:-2}  # runs in parallel per experiment
STEP_BUDGET=${STEP_BUDGET:-150}
PY=${PY:-python3}
mkdir -p "$OUT"
START=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
cd "$HERE"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/gpu.txt"
EXPERIMENTS=${*:-$(ls configs/experiments/premise_peers_*.yaml) configs/experiments/premise_mechanism.yaml}

echo "== sweeps: $(basename -a $EXPERIMENTS | tr '\n' ' ')($(left) s left)"
PIDS=()
for e in $EXPERIMENTS; do
  ( exec setsid hrp-ood sweep "$e" --jobs "$JOBS" > "$OUT/sweep_$(basename "$e" .yaml).log" 2>&1 ) &
  PIDS+=($!)
done

echo "== step and epoch times, beside the sweeps ($(left) s left)"
timeout "$STEP_BUDGET" $PY benchmarks/train_step.py --device cuda --models small_cnn,preact_resnet18 --rounds 5 \
  --epoch-samples 10000 --no-memory > "$OUT/train_step.txt" 2>&1
tail -30 "$OUT/train_step.txt"

running() { for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && return 0; done; return 1; }
while running && [ "$(left)" -gt 40 ]; do sleep 5; done
if running; then
  echo "budget reached: stopping the sweeps (their runs checkpoint and stop)"
  for p in "${PIDS[@]}"; do kill -TERM -- -"$p" 2>/dev/null; done
  sleep 12
  for p in "${PIDS[@]}"; do kill -KILL -- -"$p" 2>/dev/null; done
fi
for e in $EXPERIMENTS; do
  hrp-ood sweep "$e" --status 2>&1 | tail -1 | sed "s/^/$(basename "$e" .yaml): /"
done | tee "$OUT/status.txt"
tar -czf "$OUT/premise_runs.tar.gz" --exclude='*.pt' --exclude='tb' runs/sweeps/premise_peers runs/sweeps/premise_mechanism \
  2>/dev/null
echo "== done in $(( $(date +%s) - START )) s; results in $OUT"
