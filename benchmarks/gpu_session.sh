#!/usr/bin/env bash
# One prepared GPU session (the device tool's machine, or any CUDA box): CUDA tests, AMP step timings, and the
# largest noisy-label comparison that fits in ~9 minutes. Results land in $OUT (default ./gpu_out).
#   bash benchmarks/gpu_session.sh DATA_TARBALL [SECONDS]
set -u
DATA=${1:?cifar10-jpeg.tar.gz}
BUDGET=${2:-520}
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
START=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
if ! $PY -c "import hrp_ood.train" 2>/dev/null; then
  $PY -m pip install -q --no-deps --no-index --no-build-isolation --target /tmp/site . >"$OUT/install.log" 2>&1 \
    || { echo "install failed"; tail -5 "$OUT/install.log"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/gpu.txt"

echo "== CUDA tests ($(left) s left)"
timeout 60 $PY -m pytest -q -x tests/test_augment.py -k cuda -p no:cacheprovider 2>&1 | tail -2

echo "== step timings on CUDA, bf16 autocast ($(left) s left)"
timeout 100 $PY benchmarks/train_step.py --device cuda --rounds 5 --no-memory 2>&1 | tail -12 | tee "$OUT/train_step_cuda.txt"

echo "== noisy-label comparison ($(left) s left)"
WORK=/tmp/noisy_work
# 2026-11-28 (README, Method notes): 44 runs at once reached only epoch 13-18 of 30 in 7 minutes; 14 finish.
# The variants: the baselines (ce_meta: CE on the clean meta set too), Table 4's Base, HRP as the paper writes it
# (the defaults), the measured variant hrp_meta_weighted, HRP without the uniform prior, and HRP with the meta
# forward on batch statistics (meta_bn=batch).
SMALL_VARIANTS="ce ce_meta coteach base hrp hrp_meta_weighted hrp_p0=hrp,lambda_prior=0 hrp_bn=hrp,meta_bn=batch"
SEEDS=${SEEDS:-0}
# CPU-budget protocol (10k/2k subset, small_cnn, 30 epochs) at sym50 and sym80, two seeds, all at once
timeout $(( $(left) - 25 )) $PY benchmarks/noisy_cifar.py --data "$DATA" --work $WORK --out $WORK/small --device cuda \
  --jobs 16 --methods $SMALL_VARIANTS --noise sym50 sym80 --seeds $SEEDS --set signals_every=1000 --set on_nonfinite=skip \
  > "$OUT/small.log" 2>&1 &
SMALL=$!
# the paper's protocol on all 50k images (PreAct ResNet-18), shortened to what fits: one seed, sym50
timeout $(( $(left) - 25 )) $PY benchmarks/noisy_cifar.py --data "$DATA" --work $WORK --out $WORK/full --device cuda \
  --full --epochs 10 --warmup 3 --ramp 2 --jobs 4 --methods ce ce_meta hrp hrp_meta_weighted \
  --noise sym50 --seeds 0 --set signals_every=1000 --set on_nonfinite=skip > "$OUT/full.log" 2>&1 &
FULL=$!
while kill -0 $SMALL 2>/dev/null || kill -0 $FULL 2>/dev/null; do
  sleep 30; echo "  $(left) s left: $(ls $WORK/small/*/metrics.csv 2>/dev/null | wc -l) small runs started; " \
    "$(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader)"
done
echo "== tables (partial runs included)"
for which in small full; do
  extra=""; [ $which = full ] && extra="--full --epochs 10 --warmup 3 --ramp 2 --methods ce ce_meta hrp hrp_meta_weighted --noise sym50 --seeds 0"
  [ $which = small ] && extra="--methods $SMALL_VARIANTS --noise sym50 sym80 --seeds $SEEDS"
  $PY benchmarks/noisy_cifar.py --table-only --out $WORK/$which $extra | tee "$OUT/table_$which.md"
done
echo "== reliability probe of the full-protocol HRP checkpoint ($(left) s left)"
[ -f $WORK/full/hrp_sym50_s0/last.pt ] && timeout 90 $PY benchmarks/reliability_probe.py $WORK/full/hrp_sym50_s0 \
  --device cuda --limit 10000 | tee "$OUT/probe_full_hrp.md"
tar -czf "$OUT/runs.tar.gz" -C $WORK --exclude='*.pt' --exclude='cifar10-jpeg' --exclude='subset_*' small full
ls -la "$OUT"
