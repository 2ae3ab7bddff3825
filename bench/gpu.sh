#!/usr/bin/env bash
# The GPU benchmark, run in one call on a machine with an NVIDIA GPU (the
# device tool's lent H100/H200 here): parity of the tiny fixtures on CUDA
# against the CPU result, our Turbo 1024² and 512² (8 steps) and a Base 1024²
# step with CFG on the full-size architecture with random weights, then the
# same through diffusers (PyTorch bf16, SDPA) on the same card, and the table.
#
# Needs: bench/bin/zimage-cuda (built with `cargo build --release -p zimage-engine
# --features cuda`; bench/bin/zimage-cuda.gz is unpacked when only it is there),
# python3 with torch; diffusers from .whl/ when missing.
# Works in $WORK (default /tmp/zimage-bench); at the end copies table.md and
# log.txt and a tarball of everything to $OUT (default ./bench-out).
# Keep the whole run < 8 min.
#
# The matmul kernel for the whole-model runs is the one bench-ops finds
# fastest on this card (printed as "best matmul kernel"), unless ZIMAGE_MATMUL
# is set. QUICK=1 skips diffusers and the released-text-encoder case (for a
# second call on a card whose diffusers numbers are already in hand).
# Two checks near the start decide, for every run after them, whether the
# fused kernels not yet confirmed on CUDA run and whether compiled kernels
# are kept on disk (then a process's "first run" is only cold for kernels no
# earlier process of the call compiled).
#
# Timings of GPU run 6 (440 s) plus what was added since (session 12's VAE
# A/B, session 13's checks; less the burn-kernels A/B) put a call at about
# 8 min without the kernel cache, less with it.
set -uo pipefail
QUICK="${QUICK:-0}"
# The parts after the main cases (the released text encoder, the VAE and
# kernel A/Bs) run only while the call has time left: BUDGET_S seconds from
# the start (default 400), so that a slow cold start still leaves time for
# the table and the tarball within the device tool's limit.
BUDGET_S="${BUDGET_S:-400}"
time_left() { # name of the part: true when it may start
  if [ "$SECONDS" -lt "$BUDGET_S" ]; then return 0; fi
  log "skipped (${SECONDS} s of ${BUDGET_S} spent): $1"; return 1
}
cd "$(dirname "$0")/.."
FINAL="${OUT:-bench-out}"
OUT="${WORK:-/tmp/zimage-bench}"
mkdir -p "$OUT" "$FINAL"
Z=bench/bin/zimage-cuda
PWD_REPO=$PWD
export ZIMAGE_KERNEL_NOTES=1  # which shapes the hand-picked CUDA kernels refuse
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}:/usr/local/cuda/lib64:/usr/local/nvidia/lib64"
source bench/find_cublas.sh
# The log goes straight to $FINAL so that a run cut off by a time limit still
# returns everything it printed.
LOG="$FINAL/log.txt"
log() { echo "== $(date +%T) $*" | tee -a "$LOG"; }

if ! python3 -c "import diffusers" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi

[ -x "$Z" ] || { [ -f "$Z.gz" ] && gunzip -c "$Z.gz" > "$Z" && chmod +x "$Z"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt" "$LOG"
log "libcublas: ${ZIMAGE_CUBLAS_LIB:-not found (the cublas matmul is then not timed)}"
timeout 60 "$Z" devices 2>&1 | tee -a "$LOG"

# The tiny fixture's image: device, dtype, output file (TIMEOUT: seconds, 60).
tiny() {
  timeout "${TIMEOUT:-60}" "$Z" generate --device "$1" --dtype "$2" --model tests/fixtures/tiny-turbo -p "a photo of a cat" \
    --seed 42 -W 64 -H 64 -q -o "$3" 2>&1 | tee -a "$LOG"
}
# "MAX MEAN" of |a - b| between two images in levels of 255, or "failed: why".
img_diff() {
  python3 - "$1" "$2" <<'PY'
import sys, numpy as np
from PIL import Image
try:
    a, b = (np.asarray(Image.open(p)).astype(int) for p in sys.argv[1:3])
    print(np.abs(a - b).max(), f"{np.abs(a - b).mean():.3f}")
except Exception as e:
    print("failed:", e)
PY
}

log "parity: tiny fixtures, CUDA vs CPU"
for dt in f32 bf16; do
  tiny cpu $dt "$OUT/parity-cpu-$dt.png"
  tiny cuda $dt "$OUT/parity-cuda-$dt.png"
  read -r d m <<< "$(img_diff "$OUT/parity-cpu-$dt.png" "$OUT/parity-cuda-$dt.png")"
  echo "parity $dt: max |cuda - cpu| = $d (uint8), mean $m" | tee -a "$LOG"
done

# The fused kernels not yet confirmed on CUDA (none since GPU run 9 confirmed
# the SiLU gate, the softmax writing bf16 and the VAE's GroupNorm; a kernel
# added later starts unconfirmed, see engine/src/cube_kernels.rs) are used for
# everything below when the tiny image with them on matches the CPU's as
# closely as without them.
log "fused kernels not yet confirmed on CUDA: tiny image with them on"
ZIMAGE_GPU_FUSED_CUDA_ALL=1 tiny cuda f32 "$OUT/parity-cuda-f32-all.png"
read -r d m <<< "$(img_diff "$OUT/parity-cpu-f32.png" "$OUT/parity-cuda-f32-all.png")"
echo "all fused kernels on, f32: max |cuda - cpu| = $d, mean $m" | tee -a "$LOG"
if [[ "$d" =~ ^[0-9]+$ ]] && [ "$d" -le 2 ]; then
  export ZIMAGE_GPU_FUSED_CUDA_ALL=1
  log "fused kernels for the runs below: all, the unconfirmed ones too"
else
  log "fused kernels for the runs below: those confirmed on CUDA (Op::verified_on_cuda)"
fi

# Attention as two matmuls around the fused softmax (ZIMAGE_ATTENTION=composed,
# f32 scores since session 22): the tiny image in bf16 (the TMA matmul takes
# half precision) against the CPU's, beside the flash kernel's. bench-ops
# below decides whether the runs use it (right and faster at full size).
log "composed attention: the tiny image in bf16 with it on"
ZIMAGE_ATTENTION=composed tiny cuda bf16 "$OUT/parity-cuda-bf16-composed.png"
read -r d m <<< "$(img_diff "$OUT/parity-cpu-bf16.png" "$OUT/parity-cuda-bf16-composed.png")"
echo "composed attention, bf16: max |cuda - cpu| = $d, mean $m (flash: see parity bf16 above)" | tee -a "$LOG"
read -r d m <<< "$(img_diff "$OUT/parity-cuda-bf16.png" "$OUT/parity-cuda-bf16-composed.png")"
echo "composed attention, bf16: max |composed - flash| on CUDA = $d, mean $m" | tee -a "$LOG"

# cubecl's PTX cache (on by default since GPU run 9 found it right; see
# engine/src/device.rs): the tiny image twice into a fresh cache folder.
# The second process should skip most of NVRTC; both images must be the same.
log "kernel cache: the tiny image twice with ZIMAGE_KERNEL_CACHE=1, a fresh cache folder"
for n in 1 2; do
  t0=$(date +%s%N)
  XDG_CACHE_HOME="$OUT/kernel-cache" ZIMAGE_KERNEL_CACHE=1 TIMEOUT=90 tiny cuda bf16 "$OUT/kernel-cache-$n.png"
  echo "kernel cache, process $n: $(( ($(date +%s%N) - t0) / 1000000 )) ms" | tee -a "$LOG"
done
echo "kernel cache folder: $(du -sh "$OUT/kernel-cache" 2>/dev/null | cut -f1), $(find "$OUT/kernel-cache" -type f 2>/dev/null | wc -l) files" | tee -a "$LOG"
d=$(img_diff "$OUT/kernel-cache-1.png" "$OUT/kernel-cache-2.png" | cut -d' ' -f1)
echo "kernel cache: second image vs first, max |diff| = $d" | tee -a "$LOG"
# Where it is right, every later process of this call uses it: each would
# otherwise spend 23-36 s compiling the same kernels again.
if [ "$d" = 0 ]; then
  export ZIMAGE_KERNEL_CACHE=1 XDG_CACHE_HOME="$OUT/kernel-cache"
  log "kernel cache on for the runs below"
fi

# cuBLAS for the matmuls (session 23, first time on a card): the tiny image
# in bf16 with it, alone and with the composed attention, against the CPU's
# and the default kernel's. Where it is further off than the default kernel
# by more than a few levels, the runs below keep cubek's kernels whatever
# bench-ops times.
log "cuBLAS matmuls: the tiny image in bf16 with ZIMAGE_MATMUL=cublas"
# (Every product of the tiny model is small: ZIMAGE_CUBLAS_MIN_MACS=0 sends them all to cuBLAS.)
ZIMAGE_CUBLAS_MIN_MACS=0 ZIMAGE_MATMUL=cublas tiny cuda bf16 "$OUT/parity-cuda-bf16-cublas.png"
read -r d m <<< "$(img_diff "$OUT/parity-cpu-bf16.png" "$OUT/parity-cuda-bf16-cublas.png")"
echo "cublas, bf16: max |cuda - cpu| = $d, mean $m (default kernel: see parity bf16 above)" | tee -a "$LOG"
read -r d_default _ <<< "$(img_diff "$OUT/parity-cpu-bf16.png" "$OUT/parity-cuda-bf16.png")"
ZIMAGE_CUBLAS_MIN_MACS=0 ZIMAGE_MATMUL=cublas ZIMAGE_ATTENTION=composed tiny cuda bf16 "$OUT/parity-cuda-bf16-cublas-composed.png"
read -r dc mc <<< "$(img_diff "$OUT/parity-cpu-bf16.png" "$OUT/parity-cuda-bf16-cublas-composed.png")"
echo "cublas + composed attention, bf16: max |cuda - cpu| = $dc, mean $mc" | tee -a "$LOG"
if ! { [[ "$d" =~ ^[0-9]+$ ]] && [[ "$d_default" =~ ^[0-9]+$ ]] && [ "$d" -le $(( d_default + 4 )) ]; }; then
  if [ -z "${ZIMAGE_MATMUL:-}" ]; then export ZIMAGE_MATMUL=specialized-tma-mma; fi
  log "cuBLAS not used for the runs below (its tiny image is off, or it did not run)"
fi

# The VAE's convolutions as GEMMs (ZIMAGE_CONV=gemm, session 23, first time on
# a card; its columns kernel runs only with the unconfirmed kernels allowed):
# the tiny image in bf16 against the default (implicit-GEMM) one's.
log "convolutions as GEMMs: the tiny image in bf16 with ZIMAGE_CONV=gemm"
ZIMAGE_GPU_FUSED_CUDA_ALL=1 ZIMAGE_CONV=gemm tiny cuda bf16 "$OUT/parity-cuda-bf16-conv-gemm.png"
read -r d_conv m <<< "$(img_diff "$OUT/parity-cpu-bf16.png" "$OUT/parity-cuda-bf16-conv-gemm.png")"
echo "conv as GEMMs, bf16: max |cuda - cpu| = $d_conv, mean $m (default: see parity bf16 above)" | tee -a "$LOG"
conv_ok=0
if [[ "$d_conv" =~ ^[0-9]+$ ]] && [[ "$d_default" =~ ^[0-9]+$ ]] && [ "$d_conv" -le $(( d_default + 4 )) ]; then conv_ok=1; fi

# First the ops one by one: which kernel costs what, and the hand-picked CUDA
# kernels (flash attention, implicit-GEMM conv) checked against burn's own.
log "ops at full-size shapes (bf16)"
timeout 240 "$Z" bench-ops --device cuda --shapes full --reps 5 --json "$OUT/ops.json" 2>&1 | tee -a "$LOG" "$OUT/ops.md"
if [ -z "${ZIMAGE_MATMUL:-}" ]; then
  best=$(sed -n 's/^best matmul kernel: //p' "$OUT/ops.md" | tail -1)
  [ -n "$best" ] && export ZIMAGE_MATMUL="$best"
fi
log "matmul kernel for the runs below: ${ZIMAGE_MATMUL:-the engine default, specialized-tma-mma}"
# Attention: the flash kernel or two matmuls around the fused softmax,
# whichever bench-ops timed faster (both checked against f32 there).
if [ -z "${ZIMAGE_ATTENTION:-}" ] && grep -q "^best attention: composed" "$OUT/ops.md"; then
  export ZIMAGE_ATTENTION=composed
fi
log "attention for the runs below: ${ZIMAGE_ATTENTION:-flash}"
# Convolutions as GEMMs where bench-ops timed them faster and the tiny image was right.
if [ -z "${ZIMAGE_CONV:-}" ] && [ "$conv_ok" = 1 ] && [ -n "${ZIMAGE_GPU_FUSED_CUDA_ALL:-}" ] && grep -q "^best conv: gemm" "$OUT/ops.md"; then
  export ZIMAGE_CONV=gemm
fi
log "convolutions for the runs below: ${ZIMAGE_CONV:-implicit GEMM}"

run_ours() { # name, args...   MEMLOG=1: cubecl also logs every memory page it creates; SUB: the subcommand (bench); TIMEOUT: seconds (150)
  local name=$1; shift
  local base; base=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$OUT/mem.$name.log" &
  local pid=$!
  # cubecl reads cubecl.toml from the working directory: a directory of its own
  # keeps the page log to this one run.
  local dir=$PWD
  if [ "${MEMLOG:-0}" = 1 ]; then
    dir="$OUT/memlog-$name"; mkdir -p "$dir"
    printf '[memory.logger]\nlevel = "full"\nfile = "%s"\n' "$OUT/$name.cubecl-memory.log" > "$dir/cubecl.toml"
  fi
  (cd "$dir" && timeout "${TIMEOUT:-150}" "$PWD_REPO/$Z" "${SUB:-bench}" --device cuda --json "$OUT/$name.json" "$@") 2>&1 | tee -a "$LOG"
  kill $pid 2>/dev/null; wait $pid 2>/dev/null
  echo "$(( $(sort -n "$OUT/mem.$name.log" | tail -1) - base ))" > "$OUT/$name.peak_mib"
}

log "ours: Turbo 1024² 8 steps"
run_ours turbo1024 --config full --kind turbo -W 1024 -H 1024 --runs 1
log "ours: Turbo 512² 8 steps"
run_ours turbo512 --config full --kind turbo -W 512 -H 512 --runs 1
log "ours: Base 1024² with CFG (3 steps timed)"
run_ours base1024 --config full --kind base -W 1024 -H 1024 --steps 3 --runs 1

if [ "$QUICK" != 1 ] && time_left "diffusers"; then
log "diffusers: same configs, same card"
for spec in "turbo1024 --kind turbo --width 1024 --height 1024 --runs 1" \
            "turbo512 --kind turbo --width 512 --height 512 --runs 1" \
            "base1024 --kind base --width 1024 --height 1024 --steps 3 --runs 1"; do
  set -- $spec
  name=$1; shift
  timeout 120 python3 bench/diffusers_bench.py --config full --device cuda --json "$OUT/torch_$name.json" "$@" \
    > "$OUT/torch_$name.txt" 2>&1 || tail -5 "$OUT/torch_$name.txt"
done

# (The A/B against burn's default kernels everywhere, 3,148 ms at Turbo 512² in
# run 6, is no longer run: its time went to the fused-kernel check above.)
fi

if [ "$QUICK" != 1 ] && time_left "text encoder released"; then
  log "ours: Turbo 1024² 8 steps, text encoder released before the DiT loads (lowest memory plan; target peak <= 14 GB)"
  # With the flash kernel, as the app runs it: the composed attention's
  # scores and weights would add about 1.6 GB at 1024².
  ZIMAGE_ATTENTION=flash MEMLOG=1 run_ours turbo1024_te_released --config full --kind turbo -W 1024 -H 1024 --runs 1 --release-text-encoder
fi
# The VAE alone at 1024²: whole tensors against row bands of at most 128 MiB
# (the default since session 12): how much of the peak the pools' large
# pages took (docs/performance.md, "Session 11").
if time_left "VAE whole vs bands"; then
  log "ours: VAE decode 1024², whole tensors vs row bands"
  SUB=bench-vae TIMEOUT=60 run_ours vae1024_whole --config full -W 1024 -H 1024 --runs 1 --tensor-mib 0
  SUB=bench-vae TIMEOUT=60 run_ours vae1024_bands --config full -W 1024 -H 1024 --runs 1
  # The other convolution form (as GEMMs, or the implicit-GEMM kernel), bands.
  if [ "${ZIMAGE_CONV:-}" = gemm ]; then other_conv=implicit; else other_conv=gemm; fi
  ZIMAGE_GPU_FUSED_CUDA_ALL=1 ZIMAGE_CONV=$other_conv SUB=bench-vae TIMEOUT=60 run_ours vae1024_conv_$other_conv --config full -W 1024 -H 1024 --runs 1
fi
if time_left "the other matmul kernel"; then
  # cuBLAS against cubek's TMA kernel, whichever the runs above did not use.
  saved_matmul="${ZIMAGE_MATMUL:-}"
  if [ "$saved_matmul" = cublas ]; then export ZIMAGE_MATMUL=specialized-tma-mma; else export ZIMAGE_MATMUL=cublas; fi
  log "A/B: matmul kernel $ZIMAGE_MATMUL (Turbo 1024²)"
  run_ours turbo1024_other_matmul --config full --kind turbo -W 1024 -H 1024 --runs 1
  if [ -n "$saved_matmul" ]; then export ZIMAGE_MATMUL="$saved_matmul"; else unset ZIMAGE_MATMUL; fi
fi
if time_left "the other attention"; then
  log "A/B: the other attention (Turbo 1024²)"
  saved_attention="${ZIMAGE_ATTENTION:-}"
  if [ "$saved_attention" = composed ]; then unset ZIMAGE_ATTENTION; else export ZIMAGE_ATTENTION=composed; fi
  run_ours turbo1024_other_attention --config full --kind turbo -W 1024 -H 1024 --runs 1
  if [ -n "$saved_attention" ]; then export ZIMAGE_ATTENTION="$saved_attention"; else unset ZIMAGE_ATTENTION; fi
fi
if time_left "fused kernels off"; then
  log "A/B: the fused GPU kernels off (Turbo 512²)"
  export ZIMAGE_GPU_FUSED=0
  run_ours turbo512_unfused --config full --kind turbo -W 512 -H 512 --runs 1
  unset ZIMAGE_GPU_FUSED
fi

python3 - "$OUT" <<'PY' | tee "$OUT/table.md"
import json, sys, os
out = sys.argv[1]
def load(p):
    try:
        return json.load(open(p))
    except Exception:
        return None
print("| case | ours end-to-end ms | diffusers ms | ratio | ours DiT step ms | diffusers step ms | ours text ms | ours VAE ms | ours peak MiB (nvidia-smi) | diffusers peak MiB (allocated) |")
print("|---|---|---|---|---|---|---|---|---|---|")
for name in ("turbo1024", "turbo1024_te_released", "turbo1024_other_matmul", "turbo1024_other_attention", "turbo512", "turbo512_unfused", "base1024"):
    b_name = name.replace('_te_released', '').replace('_other_matmul', '').replace('_other_attention', '').replace('_unfused', '')
    a, b = load(f"{out}/{name}.json"), load(f"{out}/torch_{b_name}.json")
    peak = open(f"{out}/{name}.peak_mib").read().strip() if os.path.exists(f"{out}/{name}.peak_mib") else "?"
    f = lambda r, k: f"{r[k]:.1f}" if r else "failed"
    ratio = f"{a['end_to_end_ms'] / b['end_to_end_ms']:.2f}" if a and b else "-"
    print(f"| {name} | {f(a,'end_to_end_ms')} | {f(b,'end_to_end_ms')} | {ratio} | {f(a,'dit_step_mean_ms')} | {f(b,'dit_step_mean_ms')} | {f(a,'text_encode_ms')} | {f(a,'vae_decode_ms')} | {peak} | {f(b,'peak_device_mib')} |")
# What the tensors hold against what cubecl's pools keep, after each stage of
# the cold run (the pools keep pages for reuse; nvidia-smi sees them all).
print()
print("| case | after | MiB in tensors | MiB reserved by the pools |")
print("|---|---|---|---|")
for name in ("turbo1024", "turbo1024_te_released", "turbo512", "base1024"):
    a = load(f"{out}/{name}.json")
    for m in (a or {}).get("device_memory", []):
        print(f"| {name} | {m['after']} | {m['in_use_mib']:.0f} | {m['reserved_mib']:.0f} |")
# The decoder alone: whole tensors against row bands.
print()
print("| VAE 1024² | decode ms | first decode ms | peak MiB (nvidia-smi) | MiB in tensors / reserved, after the first decode |")
print("|---|---|---|---|---|")
for name in ("vae1024_whole", "vae1024_bands", "vae1024_conv_gemm", "vae1024_conv_implicit"):
    if not os.path.exists(f"{out}/{name}.peak_mib"):
        continue  # not run in this call
    a = load(f"{out}/{name}.json")
    peak = open(f"{out}/{name}.peak_mib").read().strip() if os.path.exists(f"{out}/{name}.peak_mib") else "?"
    mem = (a or {}).get("device_memory", [])
    held = f"{mem[0]['in_use_mib']:.0f} / {mem[0]['reserved_mib']:.0f}" if mem else "?"
    print(f"| {name} | {a['decode_ms']:.1f} | {a['first_decode_ms']:.1f} | {peak} | {held} |" if a else f"| {name} | failed | | {peak} | |")
PY
# The pages cubecl created for the released-text-encoder run: their sizes say
# which pool (and which tensors) the memory beyond the weights went to.
# ("full" also logs every allocation; the page events, each with the state of
# every pool, are what comes back.)
mlog="$OUT/turbo1024_te_released.cubecl-memory.log"
if [ -f "$mlog" ]; then
  grep -c "Allocated a new memory page" "$mlog" | sed 's/^/cubecl pages created (te_released): /' | tee -a "$OUT/table.md"
  grep -v "Reserved memory" "$mlog" | head -c 3000000 > "$FINAL/te_released.cubecl-pages.txt"
fi

cp "$OUT/table.md" "$OUT/ops.md" "$FINAL/" 2>/dev/null
tar czf "$FINAL/bench.tgz" -C "$OUT" . 2>/dev/null
