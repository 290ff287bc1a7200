"""A minimal PyTorch Dreambooth on the example model (issue 21): what a
quick-start recipe can reach on examples/dreambooth/tiny-model/, measured
the way scripts/comparison_distances.py measures our grid, so a recipe can
be tried here before the trainer runs it (DEVELOPERS.md, "Test fixtures
and the example model", records the results).

It fine-tunes the UNet (and with TEXT=1 the text encoder) on the subject
photos' 64 px centre squares captioned "zwxrobot", each step beside one
class image captioned "a picture of a toy" (prior preservation), with
AdamW (no weight decay), then samples both prompts from four seeds (DDIM,
20 steps, guidance 7.5) before and after. It prints the instance samples'
mean distance to the nearest subject photo (mean square in [0, 1]) before
and after, and how far each prompt's samples moved; it writes the eight
before and eight after samples as one picture (OUT).

Settings (environment): MODEL (default the example model), CLASS_IMAGES
(a folder of class images, e.g. made by `native-runner make-reg --model
examples/dreambooth/tiny-model --prompt "a picture of a toy" --count 20
--steps 20 --out <folder>`), LR (2e-4), STEPS (200), TEXT (0/1), LORA (a
rank: LoRA on the attention projections instead of a full fine-tune),
WEIGHTING: `cap20` (the example model's own training loss, (1 - a)/a
capped to [1, 20], on both terms), `min_snr` (min-SNR-γ 0.05 on both
terms), `min_snr_instance` (min-SNR-γ 0.05 on the instance term only, as
diffusers' train_dreambooth.py and our trainer do; PRIOR_WEIGHT scales the
unweighted prior term), `none`.

Needs: pip install torch diffusers transformers peft pillow numpy.
Run: CLASS_IMAGES=<folder> python scripts/example_dreambooth_torch.py
"""

import os
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
MODEL = os.environ.get("MODEL", str(ROOT / "examples" / "dreambooth" / "tiny-model"))
CLASS_IMAGES = Path(os.environ["CLASS_IMAGES"])
LR = float(os.environ.get("LR", 2e-4))
STEPS = int(os.environ.get("STEPS", 200))
TEXT = os.environ.get("TEXT", "0") == "1"
LORA = int(os.environ.get("LORA", 0))
WEIGHTING = os.environ.get("WEIGHTING", "min_snr")
PRIOR_WEIGHT = float(os.environ.get("PRIOR_WEIGHT", 1.0))
OUT = os.environ.get("OUT", "dreambooth_torch.png")
INSTANCE, CLASS = "zwxrobot", "a picture of a toy"


def centre_square(path, size=64):
    image = Image.open(path).convert("RGB")
    w, h = image.size
    s = min(w, h)
    return image.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((size, size), Image.LANCZOS)


def weight(snr, instance):
    if WEIGHTING == "cap20":
        return (1 / snr).clamp(1, 20)
    if WEIGHTING == "min_snr" or (WEIGHTING == "min_snr_instance" and instance):
        return snr.clamp(max=0.05) / snr
    return torch.ones_like(snr) * (1.0 if instance else PRIOR_WEIGHT)


def main():
    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    pipe = StableDiffusionPipeline.from_pretrained(MODEL, safety_checker=None, requires_safety_checker=False, torch_dtype=torch.float32)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    photos = [centre_square(p) for p in sorted((ROOT / "examples" / "dreambooth" / "subject").iterdir()) if p.suffix in (".jpg", ".png")]
    class_images = [centre_square(p) for p in sorted(CLASS_IMAGES.iterdir()) if p.suffix in (".jpg", ".png")]
    photo_arrays = [np.asarray(p, np.float64) / 255 for p in photos]

    def latents(images):
        x = torch.tensor(np.stack([np.asarray(i, np.float32) / 127.5 - 1 for i in images])).permute(0, 3, 1, 2)
        with torch.no_grad():
            return pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor

    instance_latents, class_latents = latents(photos), latents(class_images)
    tokens = lambda p: pipe.tokenizer(p, padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    instance_ids, class_ids = tokens(INSTANCE), tokens(CLASS)
    alphas = pipe.scheduler.alphas_cumprod

    def samples():
        return [
            [np.asarray(pipe(p, height=64, width=64, num_inference_steps=20, guidance_scale=7.5, generator=torch.Generator().manual_seed(s)).images[0], np.float64) / 255 for s in range(4)]
            for p in (INSTANCE, CLASS)
        ]

    before = samples()
    if LORA:
        from peft import LoraConfig, inject_adapter_in_model

        pipe.unet.requires_grad_(False)
        pipe.text_encoder.requires_grad_(False)
        config = lambda targets: LoraConfig(r=LORA, lora_alpha=LORA, init_lora_weights="gaussian", target_modules=targets)
        pipe.unet = inject_adapter_in_model(config(["to_k", "to_q", "to_v", "to_out.0"]), pipe.unet)
        if TEXT:
            pipe.text_encoder = inject_adapter_in_model(config(["q_proj", "k_proj", "v_proj", "out_proj"]), pipe.text_encoder)
    params = [p for p in list(pipe.unet.parameters()) + (list(pipe.text_encoder.parameters()) if TEXT else []) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0)
    pipe.unet.train()
    generator = torch.Generator().manual_seed(1)

    def term(x0, ids, instance):
        t = torch.randint(0, len(alphas), (1,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        predicted = pipe.unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, encoder_hidden_states=pipe.text_encoder(ids).last_hidden_state).sample
        return (weight(a / (1 - a), instance) * (predicted - noise) ** 2).mean()

    for _ in range(STEPS):
        i = torch.randint(0, len(instance_latents), (1,), generator=generator)
        j = torch.randint(0, len(class_latents), (1,), generator=generator)
        loss = term(instance_latents[i], instance_ids, True) + term(class_latents[j], class_ids, False)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    pipe.unet.eval()
    after = samples()

    nearest = lambda tiles: float(np.mean([min(((t - p) ** 2).mean() for p in photo_arrays) for t in tiles]))
    moved = lambda row: float(np.mean([((a - b) ** 2).mean() for a, b in zip(before[row], after[row])]))
    print(
        f"{' '.join(sys.argv[1:])} LR={LR} STEPS={STEPS} TEXT={TEXT} LORA={LORA} WEIGHTING={WEIGHTING} PRIOR_WEIGHT={PRIOR_WEIGHT}: "
        f"instance to the nearest subject photo {nearest(before[0]):.4f} -> {nearest(after[0]):.4f} "
        f"(ratio {nearest(after[0]) / nearest(before[0]):.3f}); moved: instance {moved(0):.4f}, class {moved(1):.4f} (ratio {moved(1) / moved(0):.2f})"
    )
    rows = [np.concatenate(r, 1) for r in before + after]
    Image.fromarray((np.concatenate(rows, 0) * 255).astype(np.uint8)).resize((512, 512), Image.NEAREST).save(OUT)


if __name__ == "__main__":
    main()
