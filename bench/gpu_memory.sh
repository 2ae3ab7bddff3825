#!/usr/bin/env bash
# A short GPU call (about 2 min) for the memory target of issue 5: Turbo
# 1024², 8 steps, text encoder released before the DiT loads, peak by
# nvidia-smi and by cubecl's own accounting, with each attention form; then
# the same with everything kept, for the speed. Run after bench/gpu.sh has
# checked the kernels (this one uses the build's defaults: every fused kernel,
# the kernel cache) and starts with the tiny fixture's parity as a guard.
# Needs bench/bin/zimage-cuda(.gz) as bench/gpu.sh; writes to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
FINAL="${OUT:-bench-out}"
WORK=/tmp/zimage-memory
mkdir -p "$FINAL" "$WORK"
Z=bench/bin/zimage-cuda
[ -x "$Z" ] || { [ -f "$Z.gz" ] && gunzip -c "$Z.gz" > "$Z" && chmod +x "$Z"; }
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}:/usr/local/cuda/lib64:/usr/local/nvidia/lib64"
LOG="$FINAL/memory-log.txt"
log() { echo "== $(date +%T) $*" | tee -a "$LOG"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"

log "parity: the tiny fixture's image, CUDA (defaults) vs CPU"
for dt in f32 bf16; do
  for dev in cpu cuda; do
    timeout 90 "$Z" generate --device $dev --dtype $dt --model tests/fixtures/tiny-turbo -p "a photo of a cat" \
      --seed 42 -W 64 -H 64 -q -o "$WORK/$dev-$dt.png" >> "$LOG" 2>&1
  done
  python3 - "$WORK/cpu-$dt.png" "$WORK/cuda-$dt.png" <<'PY' | tee -a "$LOG"
import sys, numpy as np
from PIL import Image
try:
    a, b = (np.asarray(Image.open(p)).astype(int) for p in sys.argv[1:3])
    print(f"parity {sys.argv[1][-8:-4]}: max |cuda - cpu| = {np.abs(a - b).max()}, mean {np.abs(a - b).mean():.3f}")
except Exception as e:
    print("parity failed:", e)
PY
done

run() { # name, args...: a bench run with nvidia-smi polled every 100 ms
  local name=$1; shift
  local base; base=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$WORK/mem.$name.log" &
  local pid=$!
  timeout 120 "$Z" bench --device cuda --config full --kind turbo -W 1024 -H 1024 --runs 1 \
    --json "$FINAL/$name.json" "$@" 2>&1 | grep -v "^note" | tee -a "$LOG"
  kill $pid 2>/dev/null; wait $pid 2>/dev/null
  local peak; peak=$(sort -n "$WORK/mem.$name.log" | tail -1)
  echo "$name: peak $(( peak - base )) MiB above the $base MiB before it (nvidia-smi)" | tee -a "$LOG" "$FINAL/peaks.txt"
}

export ZIMAGE_MATMUL=specialized-tma-mma
log "Turbo 1024², text encoder released, flash attention (the app's default)"
run te_released_flash --release-text-encoder
log "Turbo 1024², text encoder released, composed attention"
ZIMAGE_ATTENTION=composed run te_released_composed --release-text-encoder
log "Turbo 1024², everything kept, composed attention"
ZIMAGE_ATTENTION=composed run kept_composed
log "Turbo 1024², everything kept, flash attention"
run kept_flash
log "done"
