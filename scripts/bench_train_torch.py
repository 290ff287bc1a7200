"""PyTorch side of bench-train: one LoRA step (forward, backward, AdamW) of the
mid-size UNet of docs/reference.md §5 (or SD 1.5's with --unet sd15) with
diffusers + peft, on CUDA when there is one, else the CPU with 2 threads."""
import argparse
import statistics
import time

import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=5)
parser.add_argument("--unet", choices=["mid", "sd15"], default="mid")
parser.add_argument("--resolution", type=int, default=256)
parser.add_argument("--checkpointing", action="store_true")
# train_dreambooth_lora.py --mixed_precision fp16: frozen UNet in f16, LoRA in
# f32, forward under autocast. CUDA only; the CPU run stays f32.
parser.add_argument("--f16-base", action="store_true")
args = parser.parse_args()
torch.set_num_threads(2)
torch.manual_seed(0)
cuda = torch.cuda.is_available()
blocks = dict(down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=2)
if args.unet == "sd15":
    unet = UNet2DConditionModel(block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768, **blocks)
else:
    unet = UNet2DConditionModel(block_out_channels=(64, 128, 256, 256), attention_head_dim=8, cross_attention_dim=256,
                                norm_num_groups=32, **blocks)
unet.requires_grad_(False)
if args.checkpointing:
    unet.enable_gradient_checkpointing()
    unet.train()
f16 = args.f16_base and cuda
if f16:
    unet.to(torch.float16)
unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
if f16:
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
elif args.f16_base:
    print("PyTorch: --f16-base needs CUDA; the CPU run keeps f32 weights")
params = [p for p in unet.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(params, lr=1e-4)
side, width = args.resolution // 8, unet.config.cross_attention_dim
latents, context, target = torch.randn(1, 4, side, side), torch.randn(1, 77, width), torch.randn(1, 4, side, side)
if cuda:
    unet.to("cuda")
    latents, context, target = latents.cuda(), context.cuda(), target.cuda()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
times = []
for step in range(args.steps + 1):
    start = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.float16, enabled=f16):
        prediction = unet(latents, 500, context).sample
    loss = torch.nn.functional.mse_loss(prediction.float(), target)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad()
    if cuda:
        torch.cuda.synchronize()
    if step:
        times.append(time.perf_counter() - start)
# VmHWM is this process's own high-water mark; ru_maxrss would carry over
# the parent's (bench-train) peak, since Linux keeps it across execve.
with open("/proc/self/status") as status:
    peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
device = f"{peak:.0f} MiB peak RSS"
if cuda:
    device += f", {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB peak CUDA memory"
print(f"{'PyTorch (CUDA)' if cuda else 'PyTorch (CPU)':>18}{' f16 base' if f16 else ''}: LoRA step {statistics.median(times):.3f} s (median of {args.steps}), "
      f"{sum(p.numel() for p in params)} LoRA parameters, {device}")
