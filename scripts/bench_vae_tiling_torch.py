"""diffusers' side of `bench-unet --vae-decode --tile N --against-untiled`:
SD's VAE (published config, random weights) decodes the latents of a 512 px
image whole and in N px tiles (enable_tiling, overlap 0.25) and prints how
far apart the two are, the tolerance diffusers' own tiling gives.

    python scripts/bench_vae_tiling_torch.py [--resolution 512] [--tile 352]
"""
import argparse

import torch
from diffusers import AutoencoderKL

parser = argparse.ArgumentParser()
parser.add_argument("--resolution", type=int, default=512)
parser.add_argument("--tile", type=int, default=352)
args = parser.parse_args()
torch.set_num_threads(2)
torch.manual_seed(0)
vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, norm_num_groups=32).eval()
side = args.resolution // 8
latents = torch.randn(1, 4, side, side)
with torch.no_grad():
    whole = vae.decode(latents).sample
    vae.enable_tiling()
    vae.tile_sample_min_size = args.tile
    vae.tile_latent_min_size = args.tile // 8
    vae.tile_overlap_factor = 0.25
    tiled = vae.decode(latents).sample
largest = whole.abs().max()
print(f"diffusers: tiled ({args.tile} px) vs whole: max |difference| / max |whole| {float((tiled - whole).abs().max() / largest):.4f}, "
      f"mean |difference| {float((tiled - whole).abs().mean()):.4f} (max |whole| {float(largest):.3f})")
