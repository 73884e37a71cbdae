#!/usr/bin/env bash
# The prepared GPU session, one call of at most ~9 minutes (BUDGET seconds, default 520); results in $OUT
# (default ./gpu_out):
#   bash benchmarks/gpu_session.sh [--quick] [DATA]      DATA: cifar10-jpeg.tar.gz or its extracted folder
# 1. the CUDA-only tests; 2. step times of HRP, Base, CE, ... on PreAct ResNet-18 (benchmarks/train_step.py:
#    the HRP / Base and HRP / CE ratios; the paper reports ~1.3x its baseline, < 10% more memory);
# 3. the decisive comparison at the paper's scale: CIFAR-10's 50,000 training images (1,000 of them the clean
#    meta set) and 10,000 test images, PreAct ResNet-18, CE, HRP (the paper's form), hrp_meta_weighted and
#    DivideMix (at the same shortened schedule; its λu and p_threshold from the noise level), seed 0, sym50 then
#    sym80, on a schedule shortened to EPOCHS (default 8: warm-up 3, ramp 2, the paper's milestones scaled), through
#    `hrp-ood sweep` with the four runs of a noise level sharing the GPU (--jobs 4). What
#    `hrp-ood train` does on CUDA: the decoded images resident on the GPU, batched GPU augmentation, bf16 autocast;
#    channels_last on. A run the budget cuts short keeps its last.pt and its epochs in metrics.csv.
# --quick: the same steps on CPU in about a minute (tests/test_benchmarks.py): 8 training and 4 test images per
#    class, small_cnn, 2 epochs.
set -u
QUICK=0
if [ "${1:-}" = "--quick" ]; then QUICK=1; shift; fi
HERE=$(cd "$(dirname "$0")/.." && pwd)
DATA=${1:-$HERE/../shared/data/cifar10-jpeg.tar.gz}
BUDGET=${BUDGET:-520}
OUT=${OUT:-$PWD/gpu_out}
WORK=${WORK:-/tmp/gpu_session}
PY=${PY:-python3}
mkdir -p "$OUT" "$WORK"
START=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
export PYTHONUNBUFFERED=1
if [ $QUICK = 1 ]; then
  DEVICE=cpu MODEL=small_cnn EPOCHS=2 WARMUP=1 RAMP=1 META=20 BATCH=16 PER_CLASS="--train-per-class 8 --test-per-class 4"
  STEP_ARGS="--quick --device cpu"
else
  DEVICE=cuda MODEL=preact_resnet18 EPOCHS=${EPOCHS:-8} WARMUP=3 RAMP=2 META=1000 BATCH=128 PER_CLASS=""
  STEP_ARGS="--device cuda --models preact_resnet18 --rounds 5"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
fi
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/gpu.txt"

if [ $QUICK = 0 ]; then
  echo "== CUDA tests ($(left) s left)"
  (cd "$HERE" && timeout 60 $PY -m pytest -q -x tests/test_augment.py -k cuda -p no:cacheprovider 2>&1 | tail -2)
fi

echo "== step times ($(left) s left)"
(cd "$HERE" && timeout 120 $PY benchmarks/train_step.py $STEP_ARGS 2>&1) | tee "$OUT/train_step.txt" | tail -12

echo "== data ($(left) s left)"
$PY "$HERE/benchmarks/prepare_data.py" cifar10 --source "$DATA" --out "$WORK/cifar10" $PER_CLASS || exit 1

cat > "$WORK/paper_scale.yaml" <<EOF
# written by benchmarks/gpu_session.sh
config:
  dataset: folder
  data_root: $WORK/cifar10
  model: $MODEL
  device: $DEVICE
  epochs: $EPOCHS
  lr_milestones: [$(( EPOCHS * 250 / 450 )), $(( EPOCHS * 400 / 450 ))]
  warmup_epochs: $WARMUP
  ramp_epochs: $RAMP
  meta_size: $META
  batch_size: $BATCH
  meta_batch_size: $BATCH
  channels_last: true
  signals_every: 1000
grid:
  noise: [sym50, sym80]
  method: [ce, hrp, hrp_meta_weighted, dividemix]
  seed: [0]
out: $WORK/runs
retries: 0
evaluation:
  ood: [uniform_noise]
  postprocessors: [msp, ebo, mds]
  net: ensemble
report:
  by: noise
EOF
cp "$WORK/paper_scale.yaml" "$OUT/"

echo "== comparison: sym50, then sym80 while time is left ($(left) s left)"
( exec setsid hrp-ood sweep "$WORK/paper_scale.yaml" --jobs 4 > "$OUT/sweep.log" 2>&1 ) &
SWEEP=$!
while kill -0 $SWEEP 2>/dev/null && [ "$(left)" -gt 45 ]; do
  sleep 5
done
if kill -0 $SWEEP 2>/dev/null; then
  echo "budget reached: stopping the sweep (its runs checkpoint and stop)"
  kill -TERM -- -$SWEEP 2>/dev/null
  sleep 15
  kill -KILL -- -$SWEEP 2>/dev/null
fi
wait $SWEEP 2>/dev/null
hrp-ood sweep "$WORK/paper_scale.yaml" --status | tee "$OUT/status.txt"
$PY -c "
from hrp_ood.sweep import load_experiment, write_sweep_report
write_sweep_report(load_experiment('$WORK/paper_scale.yaml'))" > /dev/null 2>&1
cp "$WORK/runs/report/"*.md "$OUT/" 2>/dev/null
[ -f "$OUT/summary.md" ] && cat "$OUT/summary.md"
tar -czf "$OUT/runs.tar.gz" -C "$WORK" --exclude='*.pt' --exclude='cifar10' runs 2>/dev/null
echo "== done in $(( $(date +%s) - START )) s; results in $OUT"
