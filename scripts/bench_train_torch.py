"""PyTorch side of bench-train: one LoRA step (forward, backward, AdamW) of the
mid-size UNet of shared/spec/bench.md with diffusers + peft, CPU, 2 threads."""
import argparse
import statistics
import time

import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=5)
args = parser.parse_args()
torch.set_num_threads(2)
torch.manual_seed(0)
unet = UNet2DConditionModel(
    block_out_channels=(64, 128, 256, 256),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=2, attention_head_dim=8, cross_attention_dim=256, norm_num_groups=32,
)
unet.requires_grad_(False)
unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
params = [p for p in unet.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(params, lr=1e-4)
latents, context, target = torch.randn(1, 4, 32, 32), torch.randn(1, 77, 256), torch.randn(1, 4, 32, 32)
times = []
for step in range(args.steps + 1):
    start = time.perf_counter()
    loss = torch.nn.functional.mse_loss(unet(latents, 500, context).sample, target)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad()
    if step:
        times.append(time.perf_counter() - start)
# VmHWM is this process's own high-water mark; ru_maxrss would carry over
# the parent's (bench-train) peak, since Linux keeps it across execve.
with open("/proc/self/status") as status:
    peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
print(f"{'PyTorch (CPU)':>18}: LoRA step {statistics.median(times):.3f} s (median of {args.steps}), "
      f"{sum(p.numel() for p in params)} LoRA parameters, {peak:.0f} MiB peak RSS")
