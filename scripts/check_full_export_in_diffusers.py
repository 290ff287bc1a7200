"""Checks a Burnbooth full fine-tune export with diffusers (offline, not CI).

    python scripts/check_full_export_in_diffusers.py <exported folder> <exported .safetensors> <base diffusers folder>

Loads the exported diffusers folder with DiffusionPipeline.from_pretrained (SD
1.x/2.x or SDXL) and the single-file checkpoint with from_single_file (configs from the base
folder), and reports how far each component's weights are apart (they must be
identical) and how far the trained UNet moved from the base.
"""
import sys

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

folder, single, base = sys.argv[1:4]
from_folder = DiffusionPipeline.from_pretrained(folder)
sdxl = isinstance(from_folder, StableDiffusionXLPipeline)
pipeline = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
from_single = pipeline.from_single_file(single, config=base)
original = DiffusionPipeline.from_pretrained(base)

for component in ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if sdxl else []):
    a = getattr(from_folder, component).state_dict()
    b = getattr(from_single, component).state_dict()
    missing = sorted(set(a) ^ set(b))
    worst = max((a[k].float() - b[k].float().reshape(a[k].shape)).abs().max().item() for k in a if k in b)
    print(f"{component}: {len(a)} tensors, folder vs single file: max abs difference {worst:.3g}, names only in one: {missing[:5]}")

moved = max((from_folder.unet.state_dict()[k] - v).abs().max().item() for k, v in original.unet.state_dict().items())
print(f"trained UNet vs base: max abs change {moved:.3g}")
sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
context = torch.randn(1, 77, from_folder.text_encoder.config.hidden_size, generator=torch.Generator().manual_seed(1))
if sdxl:
    context = torch.randn(1, 77, from_folder.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    pooled = from_folder.text_encoder_2.config.projection_dim
    extra = {"added_cond_kwargs": {"text_embeds": torch.randn(1, pooled, generator=torch.Generator().manual_seed(2)),
                                   "time_ids": torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]])}}
else:
    extra = {}
with torch.no_grad():
    out_folder = from_folder.unet(sample, 10, context, **extra).sample
    out_single = from_single.unet(sample, 10, context, **extra).sample
print(f"UNet output, folder vs single file: max abs difference {(out_folder - out_single).abs().max().item():.3g}")
