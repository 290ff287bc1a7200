"""PyTorch side of bench-train: one LoRA step (forward, backward, AdamW) of a
UNet built from a diffusers config.json (bench-train writes the one it
benchmarks: the mid-size UNet of docs/reference.md §5, SD 1.5's or SDXL's)
with diffusers + peft, LoRA on the attention projections, on CUDA when there
is one, else the CPU with 2 threads. SDXL-style UNets get a pooled text
embedding and size ids, as in training."""
import argparse
import json
import statistics
import time

import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=5)
parser.add_argument("--unet-config", required=True, help="a diffusers UNet config.json")
parser.add_argument("--rank", type=int, default=4)
parser.add_argument("--resolution", type=int, default=256)
parser.add_argument("--checkpointing", action="store_true")
# train_dreambooth_lora(_sdxl).py --mixed_precision fp16: frozen UNet in f16,
# LoRA in f32, forward under autocast. CUDA only; the CPU run stays f32.
parser.add_argument("--f16-base", action="store_true")
parser.add_argument("--lora-dropout", type=float, default=0.0)
args = parser.parse_args()
torch.set_num_threads(2)
torch.manual_seed(0)
cuda = torch.cuda.is_available()
with open(args.unet_config) as f:
    config = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
unet = UNet2DConditionModel.from_config(config)
unet.requires_grad_(False)
if args.checkpointing:
    unet.enable_gradient_checkpointing()
    unet.train()
f16 = args.f16_base and cuda
if f16:
    unet.to(torch.float16)
unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian", lora_dropout=args.lora_dropout, target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
if f16:
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
elif args.f16_base:
    print("PyTorch: --f16-base needs CUDA; the CPU run keeps f32 weights")
side, width = args.resolution // 8, unet.config.cross_attention_dim
width = width[0] if isinstance(width, (list, tuple)) else width
latents, context, target = torch.randn(1, 4, side, side), torch.randn(1, 77, width), torch.randn(1, 4, side, side)
added = None
if unet.config.addition_embed_type == "text_time":
    time_width = 6 * (unet.config.addition_time_embed_dim or 256)
    pooled = torch.randn(1, unet.config.projection_class_embeddings_input_dim - time_width)
    ids = torch.tensor([[args.resolution, args.resolution, 0, 0, args.resolution, args.resolution]], dtype=torch.float32)
    added = {"text_embeds": pooled, "time_ids": ids}
if cuda:
    unet.to("cuda")
    latents, context, target = latents.cuda(), context.cuda(), target.cuda()
    if added:
        added = {k: v.cuda() for k, v in added.items()}
params = [p for p in unet.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(params, lr=1e-4)
times = []
first = None
for step in range(args.steps + 1):
    start = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.float16, enabled=f16):
        prediction = unet(latents, 500, context, added_cond_kwargs=added).sample
    loss = torch.nn.functional.mse_loss(prediction.float(), target)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad()
    if cuda:
        torch.cuda.synchronize()
    if step:
        times.append(time.perf_counter() - start)
    else:
        first = time.perf_counter() - start
# VmHWM is this process's own high-water mark; ru_maxrss would carry over
# the parent's (bench-train) peak, since Linux keeps it across execve.
with open("/proc/self/status") as status:
    peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
device = f"{peak:.0f} MiB peak RSS"
if cuda:
    device += f", {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB peak CUDA memory ({torch.cuda.get_device_name()})"
median = statistics.median(times) if times else first
print(f"{'PyTorch (CUDA)' if cuda else 'PyTorch (CPU)':>18}{' f16 base' if f16 else ''}: LoRA step {median:.3f} s (median of {args.steps}; first {first:.2f} s), "
      f"{sum(p.numel() for p in params)} LoRA parameters, {device}")
