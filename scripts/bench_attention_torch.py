"""PyTorch side of cpu-kernels's bench_attention example: forward + backward
of scaled_dot_product_attention (batch 1, 8 heads, 2 threads) at the shapes
the example passes as `queries,head_dim,keys` arguments; prints the fastest
of several runs per shape, as the example does."""
import sys
import time

import torch

torch.set_num_threads(2)
for shape in sys.argv[1:]:
    queries, head_dim, keys = map(int, shape.split(","))
    q = torch.randn(1, 8, queries, head_dim, requires_grad=True)
    k = torch.randn(1, 8, keys, head_dim, requires_grad=True)
    v = torch.randn(1, 8, keys, head_dim, requires_grad=True)
    grad = torch.randn(1, 8, queries, head_dim)
    best, best_forward = float("inf"), float("inf")
    for run in range(8 if queries >= 4096 else 32):
        start = time.perf_counter()
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        middle = time.perf_counter()
        out.backward(grad)
        end = time.perf_counter()
        if run >= 2 and end - start < best:
            best, best_forward = end - start, middle - start
    print(f"{queries} {head_dim} {keys} {best * 1e3:.2f} ms (forward {best_forward * 1e3:.2f} ms)")
