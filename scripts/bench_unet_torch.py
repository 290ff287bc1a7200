"""PyTorch side of bench-unet: the same mid-size UNet forward on the CPU."""

import argparse
import statistics
import time

import torch
from diffusers import UNet2DConditionModel

parser = argparse.ArgumentParser()
parser.add_argument("--runs", type=int, default=5)
args = parser.parse_args()

torch.manual_seed(0)
unet = UNet2DConditionModel(
    block_out_channels=(64, 128, 256, 256), layers_per_block=2, attention_head_dim=8, cross_attention_dim=256,
    norm_num_groups=32,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
).eval()
latents = torch.randn(1, 4, 32, 32)
context = torch.randn(1, 77, 256)
with torch.no_grad():
    unet(latents, 500, encoder_hidden_states=context)
    times = []
    for _ in range(args.runs):
        start = time.perf_counter()
        unet(latents, 500, encoder_hidden_states=context)
        times.append(time.perf_counter() - start)
params = sum(p.numel() for p in unet.parameters()) / 1e6
print(f"   pytorch: forward {statistics.median(times):.3f} s (median of {args.runs}, {torch.get_num_threads()} threads), {params:.1f} M parameters")
