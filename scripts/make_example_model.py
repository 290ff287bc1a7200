"""Builds examples/dreambooth/tiny-model/: meant as the base model of
README's quick start (not used yet: DEVELOPERS.md, "Test fixtures", says
what it does and does not do so far), a tiny SD1 model (the sd1 test
fixture's shapes) whose pictures mean something at the example's 64 px, so
that the first run shows Dreambooth working: before training it draws a toy for any prompt, after it draws the
robot for the instance prompt and still a toy for the class prompt.

- vae: the fixture's VAE shape (8/16 channels, 2x downsampling), trained as
  an autoencoder on random crops of all sixteen example pictures, with their
  colour channels shuffled at random (a VAE is a general image codec, SD's
  was trained on a broad image set: taught the toys alone, it reconstructed
  them 50x better than the robot); its posterior is made narrow (log-variance -12),
  as a trained VAE's is, and `scaling_factor` gives the latents unit
  variance, as diffusers picks it;
- unet: the fixture's UNet shape, trained from random weights with the
  epsilon loss on the toy pictures' latents captioned "a picture of a toy"
  (the example's class prompt), at the sizes the example trains and
  samples (64x64 and the 64 px aspect buckets), mirrored; one caption in
  ten dropped (empty prompt) as SD was trained;
- text_encoder/, tokenizer/: links to the sd1 fixture's (random weights).

Needs: pip install torch diffusers transformers safetensors pillow. Run from
anywhere: python scripts/make_example_model.py (about 25 minutes on 2 CPU
cores). Seeded, but float sums depend on the torch version and thread count:
the committed weights came from torch 2.15 on 2 threads; native-runner's
quick-start test checks what the model does, not its exact weights.
"""

import os
import shutil
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

# The training loop and loss the trained test fixture was made with.
from make_trained_fixture import epsilon_loss, fit

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "trainer-core" / "tests" / "fixtures" / "models" / "sd1" / "diffusers"
EXAMPLE = ROOT / "examples" / "dreambooth"
OUT = EXAMPLE / "tiny-model"
CLASS_PROMPT = "a picture of a toy"
VAE_STEPS = int(os.environ.get("VAE_STEPS", 1500))
UNET_STEPS = int(os.environ.get("UNET_STEPS", 2500))
BATCH = 8


def pixels(image):
    """An RGB PIL image as a [1, 3, H, W] tensor in [-1, 1], as the pipeline feeds the VAE."""
    a = np.asarray(image.convert("RGB"), np.float32)
    return torch.tensor(a).permute(2, 0, 1)[None] / 127.5 - 1


def bucket(width, height, area=64 * 64, step=8):
    """The example's 64 px pixel_area bucket of an image: about `area` pixels, sides multiples of 8."""
    aspect = width / height
    w = round((area * aspect) ** 0.5 / step) * step
    h = round((area / aspect) ** 0.5 / step) * step
    return w, h


def centre_square(image, side=64):
    w, h = image.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    return image.crop(box).resize((side, side), Image.LANCZOS)


def train_vae(vae, photos, generator):
    """Autoencoder training on random 64x64 crops (short side resized to 64-96), mirrored at random."""
    def loss_at(step):
        batch = []
        for _ in range(BATCH):
            photo = photos[torch.randint(0, len(photos), (), generator=generator).item()]
            short = 64 + torch.randint(0, 33, (), generator=generator).item()
            w, h = photo.size
            scale = short / min(w, h)
            resized = photo.resize((max(64, round(w * scale)), max(64, round(h * scale))), Image.LANCZOS)
            x = torch.randint(0, resized.size[0] - 63, (), generator=generator).item()
            y = torch.randint(0, resized.size[1] - 63, (), generator=generator).item()
            crop = pixels(resized.crop((x, y, x + 64, y + 64)))[:, torch.randperm(3, generator=generator)]
            batch.append(crop.flip(3) if torch.rand((), generator=generator) < 0.5 else crop)
        batch = torch.cat(batch)
        return torch.nn.functional.mse_loss(vae.decode(vae.encode(batch).latent_dist.mean).sample, batch)

    fit(vae, 1e-3, VAE_STEPS, loss_at, "vae")
    vae.eval()


def main():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    toys = [Image.open(p).convert("RGB") for p in sorted((EXAMPLE / "regularisation").iterdir())]
    robots = [Image.open(p).convert("RGB") for p in sorted((EXAMPLE / "subject").iterdir())]

    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(BASE / "vae"))
    with torch.no_grad():
        # quant_conv's second half of outputs is the posterior's log-variance.
        latent = vae.config.latent_channels
        vae.quant_conv.weight[latent:] = 0
        vae.quant_conv.bias[latent:] = -12.0
    train_vae(vae, toys + robots, generator)

    with torch.no_grad():
        def reconstruction_error(images):
            errors = []
            for image in images:
                x = pixels(centre_square(image))
                errors.append(torch.nn.functional.mse_loss(vae.decode(vae.encode(x).latent_dist.mean).sample, x).item())
            return sum(errors) / len(errors)
        print(f"vae reconstruction error (mean square, [-1, 1]): toys {reconstruction_error(toys):.5f}, robot {reconstruction_error(robots):.5f}")
        # Training inputs: each toy at its aspect bucket and as a 64x64 centre square, and mirrored.
        groups = {}
        for toy in toys:
            for image in (toy.resize(bucket(*toy.size), Image.LANCZOS), centre_square(toy)):
                x = pixels(image)
                for view in (x, x.flip(3)):
                    groups.setdefault(tuple(view.shape[2:]), []).append(vae.encode(view).latent_dist.mean)
        groups = {size: torch.cat(means) for size, means in groups.items()}
        scaling = float(1 / torch.cat([m.flatten() for m in groups.values()]).std())
        vae.register_to_config(scaling_factor=scaling)
        groups = {size: m * scaling for size, m in groups.items()}
        print("latent groups:", {size: m.shape[0] for size, m in groups.items()}, f"scaling_factor {scaling:.5f}")

        text_encoder = CLIPTextModel.from_pretrained(BASE / "text_encoder")
        tokenizer = CLIPTokenizer.from_pretrained(BASE / "tokenizer")
        encode = lambda p: text_encoder(tokenizer(p, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids).last_hidden_state
        context, empty = encode(CLASS_PROMPT), encode("")
        alphas = DDPMScheduler.from_pretrained(BASE / "scheduler").alphas_cumprod

    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(BASE / "unet"))
    sizes = list(groups)

    def loss_at(step):
        latents = groups[sizes[step % len(sizes)]]
        x0 = latents[torch.randint(0, latents.shape[0], (BATCH,), generator=generator)]
        ctx = torch.cat([empty if torch.rand((), generator=generator) < 0.1 else context for _ in range(BATCH)])
        t = torch.randint(0, len(alphas), (BATCH,), generator=generator)
        return epsilon_loss(unet, alphas, x0, t, ctx, torch.randn(x0.shape, generator=generator))

    fit(unet, 2e-3, UNET_STEPS, loss_at, "unet")

    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    unet.save_pretrained(OUT / "unet", safe_serialization=True)
    vae.save_pretrained(OUT / "vae", safe_serialization=True)
    shutil.copytree(BASE / "scheduler", OUT / "scheduler")
    shutil.copy(BASE / "model_index.json", OUT / "model_index.json")
    fixture = Path(os.path.relpath(BASE, OUT))
    for linked in ("text_encoder", "tokenizer"):
        os.symlink(fixture / linked, OUT / linked)
    (OUT / "README.md").write_text(
        "Written by scripts/make_example_model.py (see its docstring): the base model of README's quick start,\n"
        f"a tiny SD1 model taught {CLASS_PROMPT!r} from the ten pictures in ../regularisation/ at 64 px;\n"
        f"VAE scaling_factor {scaling:.6f}. Its UNet has never seen the robot in ../subject/.\n")
    print("wrote", OUT)


if __name__ == "__main__":
    main()
