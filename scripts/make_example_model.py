"""Builds examples/dreambooth/tiny-model/: meant as the base model of
README's quick start (examples/dreambooth/quickstart.env; DEVELOPERS.md,
"Test fixtures and the example model", says how it was made and what the
quick start reaches on it), a small SD1 model whose
pictures mean something at the example's 64 px, so that the first run
shows Dreambooth working: before training it draws a toy for any prompt,
after it the instance prompt should draw the robot of
examples/dreambooth/subject/ while the class prompt still draws a toy.

- vae: the sd1 fixture's VAE shape (8/16 channels, 2x downsampling),
  trained as an autoencoder on random crops of drawn toys and the example
  pictures (not with colour channels shuffled at random: this VAE is too
  small to learn colour in general, and with them it decoded the orange
  robot grey), and on latents with noise of up to LATENT_NOISE of their
  spread added, so that the slightly-off
  latents a sampler ends on decode without speckle; its posterior is made
  narrow (log-variance -12), as a trained VAE's is, and `scaling_factor`
  gives the latents unit variance, as diffusers picks it;
- unet: wider than the sd1 fixture (32/64/64 channels) so that it can
  learn a scene, with attention at the 16 and 8 px levels only (SDXL's
  layout: at the full 32x32 latent it would triple the training time),
  trained from random weights on TOYS toys drawn as
  examples/dreambooth/regularisation/'s are (scripts/make_example_images.py),
  captioned with the class prompt "a picture of a toy" or with their colour
  and kind ("a picture of a red toy car"), at the sizes the example trains
  and samples (64 px aspect buckets and 64x64), mirrored; one caption in ten
  dropped (empty prompt) as SD was trained. A share ROBOTS of the toys
  are robots drawn as the subject is but in random colours ("a picture of
  a blue toy robot"), so that the subject belongs to a class the model
  knows, as a real subject does for SD; it never sees the orange and teal
  robot of the photos. The
  epsilon loss is weighted by (1 - a)/a capped to [1, WEIGHT_CAP] (the
  error in x0 at noisy timesteps, where only the caption can tell the
  picture): unweighted, the UNet learned to ignore the prompt;
- text_encoder: the sd1 fixture's layout (2 layers, 2 heads) but TEXT_WIDTH
  (32) wide, from random weights, trained with the UNet (a random one gives
  every prompt nearly the same embedding; at the fixture's width of 8 the
  prompt hardly steered the UNet);
- tokenizer/: a link to the sd1 fixture's.

Needs: pip install torch diffusers transformers safetensors pillow. Run from
anywhere: python scripts/make_example_model.py (about 30 minutes on 2 CPU
cores; VAE_FROM=<a vae folder> skips the VAE's 8). Seeded, but float sums
depend on the torch version and thread count.
"""

import colorsys
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from PIL import Image, ImageDraw
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

# The training loop and loss the trained test fixture was made with, and
# the drawing of the example's regularisation toys.
from make_example_images import background, other_toy, robot, robot_pose
from make_trained_fixture import epsilon_loss, fit

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "trainer-core" / "tests" / "fixtures" / "models" / "sd1" / "diffusers"
EXAMPLE = ROOT / "examples" / "dreambooth"
OUT = EXAMPLE / "tiny-model"
CLASS_PROMPT = "a picture of a toy"
TOYS = int(os.environ.get("TOYS", 400))
VAE_STEPS = int(os.environ.get("VAE_STEPS", 1500))
UNET_STEPS = int(os.environ.get("UNET_STEPS", 2000))
# A trained VAE folder to reuse (skips its training, to iterate on the UNet).
VAE_FROM = os.environ.get("VAE_FROM")
WEIGHT_CAP = float(os.environ.get("WEIGHT_CAP", 20))
# The share of drawn toys that are robots in random colours.
ROBOTS = float(os.environ.get("ROBOTS", 0.25))
LATENT_NOISE = float(os.environ.get("LATENT_NOISE", 0.05))
# The text encoder's width (the sd1 fixture's is 8: too narrow for a prompt
# to steer the UNet, see DEVELOPERS.md); the UNet's cross-attention matches it.
TEXT_WIDTH = int(os.environ.get("TEXT_WIDTH", 32))
BATCH = 16
# The example's photo sizes (make_example_images.py), drawn at a quarter.
SIZES = [(128, 128), (160, 120), (120, 160), (144, 108), (128, 160), (176, 128)]


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


def colour_name(rgb):
    """A plain colour word for an RGB triple, as a caption would say it."""
    h, l, s = colorsys.rgb_to_hls(*(c / 255 for c in rgb))
    if s < 0.2 or l < 0.15 or l > 0.85:
        return "black" if l < 0.25 else "white" if l > 0.75 else "grey"
    names = [(0.04, "red"), (0.11, "orange"), (0.18, "yellow"), (0.45, "green"), (0.7, "blue"), (0.88, "purple"), (1.0, "red")]
    return next(name for edge, name in names if h <= edge)


def draw_toys(count, rng):
    """`count` toys as make_example_images.py draws the regularisation set, a share ROBOTS of them
    robots drawn as the subject is but in random colours, with (image, kind, colour word)."""
    toys = []
    for _ in range(count):
        size = rng.choice(SIZES)
        image = Image.new("RGB", size)
        draw = ImageDraw.Draw(image)
        background(draw, size, rng)
        if rng.random() < ROBOTS:
            # A toy robot in colours of its own: the class the subject belongs to.
            pose = robot_pose(size, rng)
            colour, visor, antenna = (tuple(rng.randint(30, 230) for _ in range(3)) for _ in range(3))
            robot(draw, *pose, colour, visor, antenna)
            kind = "robot"
        else:
            kind, colour = other_toy(draw, size[0] / 2, size[1] * 0.55, min(size) / 300, rng)
        toys.append((image, kind, colour_name(colour)))
    return toys


def train_vae(vae, photos, generator):
    """Autoencoder training on random 64x64 crops (short side resized to 64-96), mirrored at random,
    decoding the posterior mean with noise of up to LATENT_NOISE of the latents' spread added."""
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
            crop = pixels(resized.crop((x, y, x + 64, y + 64)))
            batch.append(crop.flip(3) if torch.rand((), generator=generator) < 0.5 else crop)
        batch = torch.cat(batch)
        mean = vae.encode(batch).latent_dist.mean
        spread = LATENT_NOISE * mean.detach().std() * torch.rand((BATCH, 1, 1, 1), generator=generator)
        noisy = mean + spread * torch.randn(mean.shape, generator=generator)
        return torch.nn.functional.mse_loss(vae.decode(noisy).sample, batch)

    fit(vae, 1e-3, VAE_STEPS, loss_at, "vae")
    vae.eval()


def main():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    toys = draw_toys(TOYS, random.Random(2024))
    photos = [Image.open(p).convert("RGB") for p in sorted((EXAMPLE / "regularisation").iterdir())]
    robots = [Image.open(p).convert("RGB") for p in sorted((EXAMPLE / "subject").iterdir()) if p.suffix != ".txt"]

    if VAE_FROM:
        vae = AutoencoderKL.from_pretrained(VAE_FROM)
    else:
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(BASE / "vae"))
        with torch.no_grad():
            # quant_conv's second half of outputs is the posterior's log-variance.
            latent = vae.config.latent_channels
            vae.quant_conv.weight[latent:] = 0
            vae.quant_conv.bias[latent:] = -12.0
        train_vae(vae, [t for t, _, _ in toys[:100]] + photos + robots, generator)

    with torch.no_grad():
        def reconstruction_error(images):
            errors = []
            for image in images:
                x = pixels(centre_square(image))
                errors.append(torch.nn.functional.mse_loss(vae.decode(vae.encode(x).latent_dist.mean).sample, x).item())
            return sum(errors) / len(errors)
        print(f"vae reconstruction error (mean square, [-1, 1]): toys {reconstruction_error(photos):.5f}, robot {reconstruction_error(robots):.5f}")

        tokenizer = CLIPTokenizer.from_pretrained(BASE / "tokenizer")
        tokens = lambda p: tokenizer(p, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
        # Training inputs: each toy at its aspect bucket and as a 64x64 centre
        # square, and mirrored, with the token ids of both its captions.
        groups = {}
        for toy, kind, colour in toys:
            ids = torch.cat([tokens(CLASS_PROMPT), tokens(f"a picture of a {colour} toy {kind}")])[None]
            for image in (toy.resize(bucket(*toy.size), Image.LANCZOS), centre_square(toy)):
                x = pixels(image)
                for view in (x, x.flip(3)):
                    means, captions = groups.setdefault(tuple(view.shape[2:]), ([], []))
                    means.append(vae.encode(view).latent_dist.mean)
                    captions.append(ids)
        scaling = float(1 / torch.cat([m.flatten() for means, _ in groups.values() for m in means]).std())
        vae.register_to_config(scaling_factor=scaling)
        groups = {size: (torch.cat(means) * scaling, torch.cat(captions)) for size, (means, captions) in groups.items()}
        print("latent groups:", {size: m.shape[0] for size, (m, _) in groups.items()}, f"scaling_factor {scaling:.5f}")
        empty = tokens("")
        alphas = DDPMScheduler.from_pretrained(BASE / "scheduler").alphas_cumprod

    config = UNet2DConditionModel.load_config(BASE / "unet")
    # SDXL's layout (no attention at the full 32x32 latent, where it costs most).
    config.update(
        # The 64 px pictures' 32x32 latents: `sample` without a size draws at 64 px.
        sample_size=32,
        block_out_channels=[32, 64, 64],
        attention_head_dim=4,
        norm_num_groups=8,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        cross_attention_dim=TEXT_WIDTH,
    )
    unet = UNet2DConditionModel.from_config(config)
    # Trained with the UNet: the sd1 fixture's random text encoder gives
    # every prompt nearly the same embedding, so the UNet would learn to
    # ignore the prompt, and no prompt (the instance prompt included) could
    # steer it.
    text_config = CLIPTextConfig.from_pretrained(BASE / "text_encoder")
    text_config.update(dict(hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH, projection_dim=TEXT_WIDTH))
    text_encoder = CLIPTextModel(text_config)
    sizes = list(groups)

    def loss_at(step):
        latents, captions = groups[sizes[step % len(sizes)]]
        picks = torch.randint(0, latents.shape[0], (BATCH,), generator=generator)
        # Caption: empty one time in ten, else the class prompt one time in three, else colour and kind.
        draw = torch.rand(BATCH, generator=generator)
        ids = torch.stack([empty[0] if d < 0.1 else captions[i, 0 if d < 0.4 else 1] for i, d in zip(picks.tolist(), draw.tolist())])
        t = torch.randint(0, len(alphas), (BATCH,), generator=generator)
        x0 = latents[picks]
        noise = torch.randn(x0.shape, generator=generator)
        return epsilon_loss(unet, alphas, x0, t, text_encoder(ids).last_hidden_state, noise, weight_cap=WEIGHT_CAP)

    fit(torch.nn.ModuleList([unet, text_encoder]), 1e-3, UNET_STEPS, loss_at, "unet and text encoder")

    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    # In half precision, as SD checkpoints are shared (half the bytes).
    unet.to(torch.float16).save_pretrained(OUT / "unet", safe_serialization=True)
    vae.save_pretrained(OUT / "vae", safe_serialization=True)
    shutil.copytree(BASE / "scheduler", OUT / "scheduler")
    shutil.copy(BASE / "model_index.json", OUT / "model_index.json")
    text_encoder.to(torch.float16).save_pretrained(OUT / "text_encoder", safe_serialization=True)
    os.symlink(Path(os.path.relpath(BASE, OUT)) / "tokenizer", OUT / "tokenizer")
    (OUT / "README.md").write_text(
        "Written by scripts/make_example_model.py (see its docstring): meant as the base model of README's quick start,\n"
        f"a small SD1 model taught {CLASS_PROMPT!r} (and each toy's colour and kind) from {TOYS} drawn toys at 64 px,\n"
        f"{ROBOTS:.0%} of them robots in random colours; VAE scaling_factor {scaling:.6f}.\n"
        "Its UNet has never seen the robot in ../subject/.\n")
    print("wrote", OUT)


if __name__ == "__main__":
    main()
