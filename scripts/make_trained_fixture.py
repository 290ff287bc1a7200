"""Builds trainer-core/tests/fixtures/models/sd1-trained/: the tiny SD1
fixture (sd1/, from make_fixtures.py) taught four captioned kinds of image,
so that its prompts mean something. Random weights cannot show what prior
preservation is for (keeping what the base model draws for the class
prompt): a random UNet does not denoise, so its samples are noise-dominated
and every prompt drifts alike. This one learned "a photo of a toy"
(the training test's class images) next to a ball, a tree and a boat.

Changes against sd1/diffusers/:
- vae: the posterior is made narrow (logvar about -12), as a trained VAE's
  is, and `scaling_factor` is set so the toy latents have unit variance (how
  diffusers picks it), so the latents are signal, not sampling noise;
- unet: 3000 AdamW steps (batch 16, lr 2e-3 decaying to 0 on a cosine) of
  the epsilon loss on the 16 captioned images, one caption in ten dropped
  (empty prompt) as SD was trained, so classifier-free guidance works;
- text_encoder/, tokenizer/: links to sd1's (unchanged).

Needs: pip install torch diffusers transformers safetensors. Run from
anywhere: python scripts/make_trained_fixture.py (5 minutes on 2 CPU
cores). Seeded, but float sums depend on the torch version and thread
count: the committed weights came from torch 2.15 on 2 threads, and the test
checks behaviour (the base samples its class), not these exact weights.
"""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "trainer-core" / "tests" / "fixtures" / "models"
BASE = MODELS / "sd1" / "diffusers"
OUT = MODELS / "sd1-trained"
UNET_STEPS = 3000


def image(colour):
    """A 32x32 RGB image from colour(x, y), in [-1, 1] as the pipeline feeds the VAE."""
    a = np.array([[colour(x, y) for x in range(32)] for y in range(32)], np.float32)
    return torch.tensor(a).permute(2, 0, 1)[None] / 127.5 - 1


# The same formulas as trainer-core/tests/training.rs (toy = class_image).
def toy(i): return image(lambda x, y: (x * 8, 40 + i * 30, y * 8))
def ball(i): return image(lambda x, y: (20, 40, 200) if (x - 16) ** 2 + (y - 16) ** 2 < 100 + i * 20 else (10, 10, 10))
def tree(i): return image(lambda x, y: (200, 180, 20) if (x // (3 + i)) % 2 == 0 else (60, 20, 90))
def boat(i): return image(lambda x, y: (250, 120, 0) if y > 12 + i * 2 else (30, 160, 220))


def fit(module, lr, steps, loss_at, label):
    """Trains `module` for `steps` AdamW steps (no weight decay, `lr` decaying
    to 0 on a cosine); `loss_at(step)` draws that step's batch and returns its loss."""
    optimizer = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    module.train()
    for step in range(steps):
        loss = loss_at(step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 250 == 0 or step == steps - 1:
            print(f"{label} step {step}: loss {loss.item():.5f}", flush=True)


def epsilon_loss(unet, alphas, x0, t, context, noise, weight_cap=None):
    """SD's training loss: the UNet predicts the noise added to `x0` at timesteps `t`.
    With `weight_cap`, each sample's square error is weighted by (1 - a)/a capped to
    [1, weight_cap]: the error in x0 at noisy timesteps, where only the caption can
    tell the picture."""
    a = alphas[t].view(-1, 1, 1, 1)
    predicted = unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, encoder_hidden_states=context).sample
    if weight_cap is None:
        return torch.nn.functional.mse_loss(predicted, noise)
    return (((1 - a) / a).clamp(1, weight_cap) * (predicted - noise) ** 2).mean()


CONCEPTS = {"a photo of a toy": toy, "a photo of a ball": ball, "a photo of a tree": tree, "a photo of a boat": boat}


def main():
    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    unet = UNet2DConditionModel.from_pretrained(BASE / "unet")
    vae = AutoencoderKL.from_pretrained(BASE / "vae")
    text_encoder = CLIPTextModel.from_pretrained(BASE / "text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(BASE / "tokenizer")
    alphas = DDPMScheduler.from_pretrained(BASE / "scheduler").alphas_cumprod

    with torch.no_grad():
        # quant_conv's second half of outputs is the posterior's log-variance.
        latent = vae.config.latent_channels
        vae.quant_conv.weight[latent:] = 0
        vae.quant_conv.bias[latent:] = -12.0
        means = {p: torch.cat([vae.encode(make(i)).latent_dist.mean for i in range(4)]) for p, make in CONCEPTS.items()}
        scaling = float(1 / means["a photo of a toy"].std())
        vae.register_to_config(scaling_factor=scaling)
        latents = {p: m * scaling for p, m in means.items()}
        ids = {p: tokenizer(p, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids for p in CONCEPTS}
        context = {p: text_encoder(i).last_hidden_state for p, i in ids.items()}
        empty = text_encoder(tokenizer("", padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids).last_hidden_state

    prompts = list(CONCEPTS)

    def loss_at(step):
        picks = [(prompts[torch.randint(0, 4, ()).item()], torch.randint(0, 4, ()).item()) for _ in range(16)]
        x0 = torch.cat([latents[p][i:i + 1] for p, i in picks])
        ctx = torch.cat([empty if torch.rand(()) < 0.1 else context[p] for p, _ in picks])
        t = torch.randint(0, len(alphas), (len(picks),))
        return epsilon_loss(unet, alphas, x0, t, ctx, torch.randn_like(x0))

    fit(unet, 2e-3, UNET_STEPS, loss_at, "unet")

    if OUT.exists():
        shutil.rmtree(OUT)
    folder = OUT / "diffusers"
    folder.mkdir(parents=True)
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    shutil.copytree(BASE / "scheduler", folder / "scheduler")
    shutil.copy(BASE / "model_index.json", folder / "model_index.json")
    for linked in ("text_encoder", "tokenizer"):
        os.symlink(Path("..") / ".." / "sd1" / "diffusers" / linked, folder / linked)
    (OUT / "README.md").write_text(
        "Written by scripts/make_trained_fixture.py (see its docstring): the tiny SD1 model\n"
        f"taught {', '.join(repr(p) for p in CONCEPTS)}; VAE scaling_factor {scaling:.6f}.\n")
    print("wrote", OUT)


if __name__ == "__main__":
    main()
