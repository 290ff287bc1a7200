"""PyTorch side of `bench-unet --convs`: SD 1.5's 3x3 convolutions at 512 px
(320 channels at 64x64, 640 at 32x32, 1280 at 16x16), the forward and the
input's gradient (what a LoRA step's backward asks of a frozen convolution),
on the CPU in f32."""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

parser = argparse.ArgumentParser()
parser.add_argument("--runs", type=int, default=5)
args = parser.parse_args()


def median_time(work, runs):
    work()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


torch.manual_seed(0)
for channels, side in [(320, 64), (640, 32), (1280, 16)]:
    x = torch.randn(1, channels, side, side)
    weight = torch.randn(channels, channels, 3, 3) * 0.02
    flops = 2 * channels * channels * 9 * side * side
    with torch.no_grad():
        forward = median_time(lambda: F.conv2d(x, weight, padding=1), args.runs)
    tracked = x.clone().requires_grad_()

    def input_gradient():
        tracked.grad = None
        F.conv2d(tracked, weight, padding=1).sum().backward()

    both = median_time(input_gradient, args.runs)
    backward = max(both - forward, 1e-9)
    print(
        f"   pytorch: conv {channels}ch {side}x{side}: forward {forward * 1e3:.1f} ms ({flops / forward / 1e9:.0f} GFLOP/s), "
        f"input gradient {backward * 1e3:.1f} ms ({flops / backward / 1e9:.0f} GFLOP/s), {torch.get_num_threads()} threads"
    )
