"""Loads a Burnbooth kohya LoRA into diffusers and checks it changes the UNet
exactly as Burnbooth's merge does (W' = W + multiplier * alpha/rank * up @ down).

Offline check, not part of CI (CI needs no Python):
    pip install torch diffusers transformers peft safetensors
    native-runner train --config examples/dreambooth/tiny.env --device cpu
    python scripts/check_lora_in_diffusers.py \
        trainer-core/tests/fixtures/models/sd1/diffusers \
        examples/dreambooth/output/tiny/burnbooth-lora.safetensors
"""
import sys

import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file


def main(model: str, lora: str) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    tensors = load_file(lora)

    # Burnbooth's merge, done here by hand from the file.
    expected = dict(base)
    modules = sorted({k.split(".")[0] for k in tensors})
    by_kohya = {("lora_unet_" + k[: -len(".weight")].replace(".", "_")): k for k in base if k.endswith(".weight")}
    for module in modules:
        down, up = tensors[f"{module}.lora_down.weight"], tensors[f"{module}.lora_up.weight"]
        alpha = float(tensors[f"{module}.alpha"])
        key = by_kohya[module]
        expected[key] = base[key] + (alpha / down.shape[0]) * (up @ down)

    sample = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out_base = pipe.unet(sample, 500, context).sample
        pipe.load_lora_weights(lora)
        out_lora = pipe.unet(sample, 500, context).sample
        pipe.fuse_lora()
        pipe.unload_lora_weights()
        fused = pipe.unet.state_dict()
        pipe.unet.load_state_dict(expected)
        out_expected = pipe.unet(sample, 500, context).sample

    weight_error = max((fused[k] - expected[k]).abs().max().item() for k in expected)
    changed = sum(1 for k in expected if not torch.equal(expected[k], base[k]))
    rel = ((out_lora - out_expected).norm() / out_expected.norm()).item()
    moved = ((out_lora - out_base).norm() / out_base.norm()).item()
    print(f"{len(modules)} LoRA modules, {changed} UNet weights changed")
    print(f"fused weights vs W + alpha/r*up@down: max abs error {weight_error:.3e}")
    print(f"UNet output with the LoRA (diffusers) vs merged by hand: relative L2 error {rel:.3e}; the LoRA moves the output by {moved:.3e}")
    assert len(modules) > 0 and changed == len(modules)
    assert weight_error < 1e-6 and rel < 1e-5, "diffusers applies the LoRA differently"
    print("OK: diffusers loads the Burnbooth LoRA and applies it exactly as Burnbooth merges it")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
