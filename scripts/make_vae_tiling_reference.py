"""Reference for tiled VAE decoding and encoding (diffusers' enable_tiling):
the tiny SD1 fixture's VAE decodes a non-square latent and encodes a
non-square image, tiled with 16-pixel tiles (8 latent) and diffusers'
overlap of 0.25, and untiled. Written to
trainer-core/tests/fixtures/models/sd1/vae_tiling.safetensors and compared by
trainer-core/tests/models.rs (vae_tiling_matches_diffusers).

Needs: pip install torch diffusers safetensors. Run from the repository root:
    python scripts/make_vae_tiling_reference.py
"""
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

ROOT = "trainer-core/tests/fixtures/models/sd1"
TILE = 16

torch.manual_seed(0)
vae = AutoencoderKL.from_pretrained(f"{ROOT}/diffusers", subfolder="vae").eval()
latents = torch.randn(1, 4, 19, 13)
image = torch.rand(1, 3, 38, 26) * 2 - 1
with torch.no_grad():
    untiled_decoded = vae.decode(latents).sample
    untiled_moments = vae.encode(image).latent_dist
    vae.enable_tiling()
    vae.tile_sample_min_size = TILE
    vae.tile_latent_min_size = TILE // 2 ** (len(vae.config.block_out_channels) - 1)
    vae.tile_overlap_factor = 0.25
    tiled_decoded = vae.decode(latents).sample
    tiled_moments = vae.encode(image).latent_dist

difference = (tiled_decoded - untiled_decoded).abs().max() / untiled_decoded.abs().max()
print(f"diffusers: tiled vs untiled decode, max|a-b|/max|a| = {difference:.4f}")
save_file({
    "latents": latents.contiguous(),
    "image": image.contiguous(),
    "decoded_untiled": untiled_decoded.contiguous(),
    "decoded_tiled": tiled_decoded.contiguous(),
    "mean_untiled": untiled_moments.mean.contiguous(),
    "mean_tiled": tiled_moments.mean.contiguous(),
    "logvar_tiled": tiled_moments.logvar.contiguous(),
}, f"{ROOT}/vae_tiling.safetensors", metadata={"tile_sample_size": str(TILE), "overlap": "0.25"})
print(f"wrote {ROOT}/vae_tiling.safetensors")
