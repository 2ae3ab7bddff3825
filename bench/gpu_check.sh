#!/usr/bin/env bash
# A short correctness check on a lent NVIDIA GPU (about a minute once the
# kernels compile): the tiny fixture's image on CUDA against the CPU's, with
# the fused GPU kernels on, off, and in other variants (VARIANTS, e.g.
# "off:ZIMAGE_GPU_FUSED=0 rope-off:ZIMAGE_GPU_FUSED_OFF=rope": which setting a
# wrong image comes from), then `bench-ops --only attention` (the flash
# kernel, the composed attention and its pieces, each against f32), and the
# whole model with the composed attention where that was right and faster.
# Also the tiny image in bf16 with cuBLAS and with the convolutions as GEMMs.
# Needs bench/bin/zimage-cuda(.gz) as bench/gpu.sh; writes to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
FINAL="${OUT:-bench-out}"
mkdir -p "$FINAL"
Z=bench/bin/zimage-cuda
[ -x "$Z" ] || { [ -f "$Z.gz" ] && gunzip -c "$Z.gz" > "$Z" && chmod +x "$Z"; }
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}:/usr/local/cuda/lib64:/usr/local/nvidia/lib64"
source bench/find_cublas.sh
LOG="$FINAL/check.txt"
gen() { # device, dtype, output
  timeout 60 "$Z" generate --device "$1" --dtype "$2" --model tests/fixtures/tiny-turbo -p "a photo of a cat" \
    --seed 42 -W 64 -H 64 -q -o "$3" > /dev/null 2>> "$FINAL/generate-stderr.txt"
}
# name:VARIABLE=value — each a CUDA run of the tiny fixture with that setting.
variants="${VARIANTS:-on:ZIMAGE_GPU_FUSED=1 off:ZIMAGE_GPU_FUSED=0 unverified-too:ZIMAGE_GPU_FUSED_CUDA_ALL=1}"
for dt in f32 bf16; do
  gen cpu $dt "$FINAL/cpu-$dt.png"
  for v in $variants; do
    [ $dt = bf16 ] && [ "${v%%:*}" != on ] && continue
    ( export "${v#*:}"; gen cuda $dt "$FINAL/cuda-$dt-${v%%:*}.png" )
  done
done
# Session 23's paths, half precision only: cuBLAS for every product, the
# convolutions as GEMMs (their columns kernel is not yet verified on CUDA).
half_variants="cublas:ZIMAGE_MATMUL=cublas,ZIMAGE_CUBLAS_MIN_MACS=0 conv-gemm:ZIMAGE_CONV=gemm,ZIMAGE_GPU_FUSED_CUDA_ALL=1"
for v in $half_variants; do
  ( IFS=, && for kv in ${v#*:}; do export "$kv"; done; gen cuda bf16 "$FINAL/cuda-bf16-${v%%:*}.png" )
done
echo "libcublas: ${ZIMAGE_CUBLAS_LIB:-not found}" | tee -a "$LOG"
timeout 60 "$Z" devices 2>&1 | tee -a "$LOG"
# A kernel that fails to compile panics on cubecl's server thread: say so.
echo "generate stderr: $(grep -c -i -E "panic|error" "$FINAL/generate-stderr.txt" 2>/dev/null) lines with panic/error (generate-stderr.txt)" | tee -a "$LOG"
python3 - "$FINAL" $variants <<'PY' | tee -a "$LOG"
import sys, numpy as np
from PIL import Image
out, names = sys.argv[1], [v.split(":")[0] for v in sys.argv[2:]]
for dt in ("f32", "bf16"):
    a = np.asarray(Image.open(f"{out}/cpu-{dt}.png")).astype(int)
    for name in names if dt == "f32" else ["on", "cublas", "conv-gemm"]:
        try:
            b = np.asarray(Image.open(f"{out}/cuda-{dt}-{name}.png")).astype(int)
            print(f"{dt} {name:18} max |cuda - cpu| {np.abs(a - b).max():3} mean {np.abs(a - b).mean():.3f}")
        except Exception as e:
            print(f"{dt} {name}: failed: {e}")
PY
# The VAE in row bands against whole tensors on the card (512², bands of at most
# 16 MiB: several per level, the attention in query chunks), in f32 and bf16.
for dt in f32 bf16; do
  echo "== VAE bands vs whole, $dt" | tee -a "$LOG"
  timeout 90 "$Z" bench-vae --device cuda --dtype $dt --config full -W 512 -H 512 --tensor-mib 16 --runs 1 --check 2>&1 \
    | grep -E "decode|bands vs whole|GPU memory" | tee -a "$LOG"
done
# With the kernels not yet verified on CUDA on too, so that their pieces are checked
# (with cuBLAS's composed attention where libcublas loads).
ZIMAGE_GPU_FUSED_CUDA_ALL=1 timeout 150 "$Z" bench-ops --device cuda --shapes full --reps 3 --only attention 2>&1 | grep -v "^note" | tee -a "$LOG"
# The whole model with the composed attention where bench-ops found it right and faster.
if grep -q "^best attention: composed" "$LOG"; then
  export ZIMAGE_ATTENTION=composed ZIMAGE_GPU_FUSED_CUDA_ALL=1
  for spec in "turbo1024 --kind turbo -W 1024 -H 1024" "base1024 --kind base -W 1024 -H 1024 --steps 3"; do
    set -- $spec; name=$1; shift
    echo "== composed attention: $name" | tee -a "$LOG"
    timeout 100 "$Z" bench --device cuda --config full --runs 1 --json "$FINAL/${name}_composed.json" "$@" 2>&1 | grep -v "^note" | tail -8 | tee -a "$LOG"
  done
fi
# The CUDA source of the fused kernels as cubecl compiled them (its compilation
# log), for the kernels that were wrong on CUDA in GPU runs 7-8 (SiLU gate,
# softmax writing bf16) next to the right ones (RMSNorm, RoPE).
( export CUBECL_DEBUG_LOG="$FINAL/cubecl-full.log" ZIMAGE_GPU_FUSED_CUDA_ALL=1; gen cuda f32 "$FINAL/cuda-f32-logged.png" )
ZIMAGE_GPU_FUSED_CUDA_ALL=1 CUBECL_DEBUG_LOG="$FINAL/cubecl-full.log" timeout 60 "$Z" bench-ops --device cuda --shapes tiny --reps 1 --only attention > /dev/null 2>&1
awk '/\[START_KERNEL_COMPILATION\]/{keep=0; buf=""} {buf = buf $0 "\n"} /^name: zimage_engine::cube_kernels/{keep=1} /\[END_KERNEL_COMPILATION\]/{if (keep) printf "%s", buf; buf=""; keep=0}' \
  "$FINAL/cubecl-full.log" > "$FINAL/cube-kernels-cuda-source.txt" 2>/dev/null
rm -f "$FINAL/cubecl-full.log"
echo "CUDA sources of the fused kernels: $(grep -c START_KERNEL "$FINAL/cube-kernels-cuda-source.txt" 2>/dev/null) kernels in cube-kernels-cuda-source.txt" | tee -a "$LOG"
