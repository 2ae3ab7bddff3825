#!/usr/bin/env bash
# CPU benchmark beside PyTorch: the tiny and medium configurations with the
# SAME random weights (a diffusers folder written by bench/make_model.py),
# timed by `zimage bench --model` and by bench/diffusers_bench.py --model.
# Needs the reference-oracle venv (README: tests/fixtures/requirements.txt):
#   PY=.venv/bin/python bench/cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-python3}"
OUT="${OUT:-bench-out/cpu}"
Z="${Z:-target/release/zimage}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
for cfg in "tiny 256 8" "medium 256 8"; do
  set -- $cfg
  name=$1 size=$2 steps=$3
  dir="$OUT/model-$name"
  [ -d "$dir" ] || PYTHONPATH=bench "$PY" bench/make_model.py --config "$name" --out "$dir" >/dev/null
  "$Z" bench --model "$dir" -W "$size" -H "$size" --steps "$steps" --tokens 100 --runs 2 --json "$OUT/ours-$name.json" > "$OUT/ours-$name.txt"
  for threads in 1 2; do
    OMP_NUM_THREADS=$threads TORCH_THREADS=$threads "$PY" bench/diffusers_bench.py --model "$dir" --device cpu \
      --width "$size" --height "$size" --steps "$steps" --tokens 100 --runs 2 --threads "$threads" \
      --json "$OUT/torch-$name-t$threads.json" > "$OUT/torch-$name-t$threads.txt" 2>&1
  done
done
"$PY" - "$OUT" <<'PY' | tee "$OUT/table.md"
import json, sys
out = sys.argv[1]
print("| config | stage | ours (2 threads) ms | PyTorch 1 thread ms | PyTorch 2 threads ms | ours / best PyTorch |")
print("|---|---|---|---|---|---|")
for name in ("tiny", "medium"):
    o = json.load(open(f"{out}/ours-{name}.json"))
    t1 = json.load(open(f"{out}/torch-{name}-t1.json"))
    t2 = json.load(open(f"{out}/torch-{name}-t2.json"))
    for key, label in (("text_encode_ms", "text encode"), ("dit_step_mean_ms", "DiT step"), ("vae_decode_ms", "VAE decode"), ("end_to_end_ms", "end to end")):
        best = min(t1[key], t2[key])
        print(f"| {name} {o['width']}² {o['steps']} steps | {label} | {o[key]:.1f} | {t1[key]:.1f} | {t2[key]:.1f} | {o[key] / best:.2f} |")
PY
