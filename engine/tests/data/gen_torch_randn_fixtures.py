"""Regenerates torch_randn_cpu.bin and the hash table used by engine/src/rng.rs tests.

Run with a CPU build of torch on an x86-64 machine with AVX2 or AVX-512
(torch.backends.cpu.get_cpu_capability() in {"AVX2", "AVX512"}):

    python gen_torch_randn_fixtures.py            # writes torch_randn_cpu.bin, prints hashes
    ATEN_CPU_CAPABILITY=default python gen_torch_randn_fixtures.py --hashes-only

The .bin file is the little-endian f32 values of the cases below, concatenated
in order; the Rust test walks the same case list.
"""
import sys
import numpy as np
import torch

torch.set_num_threads(1)

SIZES = [1, 5, 15, 16, 17, 100, 960, 2000]
FRESH = [(0, SIZES), (42, SIZES), (1234567890123, [17, 960]), (2**64 - 1, [5, 100])]
SEQ = (7, [5, 16, 1, 1, 17, 2, 3, 33])
HASHES = [(0, 262144), (42, 262144), (1234567890123, 262144), (42, 1000003), (3, 17), (3, 960)]


def randn(g, n):
    return torch.randn(n, generator=g, dtype=torch.float32).numpy()


def fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def main():
    print("capability:", torch.backends.cpu.get_cpu_capability(), "torch", torch.__version__)
    if "--hashes-only" not in sys.argv:
        out = []
        for seed, sizes in FRESH:
            for n in sizes:
                out.append(randn(torch.Generator().manual_seed(seed), n))
        seed, sizes = SEQ
        g = torch.Generator().manual_seed(seed)
        for n in sizes:
            out.append(randn(g, n))
        data = np.concatenate(out).astype("<f4").tobytes()
        with open("torch_randn_cpu.bin", "wb") as f:
            f.write(data)
        print("wrote torch_randn_cpu.bin,", len(data), "bytes")
    for seed, n in HASHES:
        v = randn(torch.Generator().manual_seed(seed), n)
        print(f"({seed}, {n}, 0x{fnv1a64(v.astype('<f4').tobytes()):016x}),")


if __name__ == "__main__":
    main()
