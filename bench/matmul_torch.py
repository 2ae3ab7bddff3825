# PyTorch matmul throughput at the shapes of engine/examples/matmul_threads.rs:
#   python bench/matmul_torch.py THREADS
import torch, time, sys
torch.set_num_threads(int(sys.argv[1]))
for m,k,n in [(384,768,768),(384,768,2048),(384,2048,768),(100,1024,3072),(4096,576,64)]:
    a=torch.randn(m,k); w=torch.randn(n,k)
    torch.nn.functional.linear(a,w)
    t=time.perf_counter(); reps=20
    for _ in range(reps): torch.nn.functional.linear(a,w)
    s=(time.perf_counter()-t)/reps
    print(f"{m}x{k}x{n}: {s*1e3:.2f} ms, {2*m*k*n/s/1e9:.1f} GFLOP/s")
