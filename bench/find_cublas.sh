# Sourced by bench/gpu.sh and bench/gpu_check.sh: libcublas for
# ZIMAGE_MATMUL=cublas (engine/src/cublas.rs), a CUDA toolkit's, else the one
# PyTorch's wheels bring (nvidia/cu13/lib or nvidia/cublas/lib), exported as
# ZIMAGE_CUBLAS_LIB with its folder on LD_LIBRARY_PATH; empty when none.
if [ -z "${ZIMAGE_CUBLAS_LIB:-}" ]; then
  ZIMAGE_CUBLAS_LIB=$(python3 - <<'PY' 2>/dev/null
import glob, os, sys
found = []
for root in ["/usr/local/cuda/lib64", "/usr/lib/x86_64-linux-gnu"] + [os.path.join(p, "nvidia", "*", "lib") for p in sys.path if p]:
    found += [f for f in glob.glob(os.path.join(root, "libcublas.so*")) if "Lt" not in os.path.basename(f)]
print(sorted(found, key=len)[0] if found else "")
PY
)
fi
if [ -n "$ZIMAGE_CUBLAS_LIB" ]; then
  export ZIMAGE_CUBLAS_LIB LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}:$(dirname "$ZIMAGE_CUBLAS_LIB")"
fi
