"""Loads a Burnbooth kohya LoRA into diffusers and checks it changes the UNet
exactly as Burnbooth's merge does (W' = W + multiplier * alpha/rank * up @ down,
over flattened kernels for LoCon's convolutions).

Offline check, not part of CI (CI needs no Python):
    pip install torch diffusers transformers peft safetensors
    native-runner train --config examples/dreambooth/tiny.env --device cpu
    python scripts/check_lora_in_diffusers.py \
        trainer-core/tests/fixtures/models/sd1/diffusers \
        examples/dreambooth/output/tiny/burnbooth-lora.safetensors
"""
import sys
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file


def kohya_names(prefix, weights, unet_config):
    """kohya module name -> the component's weight name."""
    names = {k: k[: -len(".weight")] for k in weights if k.endswith(".weight")}
    if prefix.startswith("lora_te"):
        # transformers 5 names CLIPTextModel's weights without `text_model.`; kohya names keep it.
        names = {k: (n if n.startswith("text_model.") else "text_model." + n) for k, n in names.items()}
    elif unet_config.addition_embed_type == "text_time":
        # SDXL files use SGM block paths: map with the fixture script's own
        # diffusers -> LDM converter (independent of Burnbooth's Rust one).
        sys.path.insert(0, str(Path(__file__).parent))
        from make_fixtures import unet_to_ldm
        ldm = unet_to_ldm({k: weights[k] for k in names}, unet_config)
        names = {k: n.removeprefix("model.diffusion_model.")[: -len(".weight")] for k, n in zip(names, ldm)}
    return {prefix + n.replace(".", "_"): k for k, n in names.items()}


def main(model: str, lora: str) -> None:
    pipe = DiffusionPipeline.from_pretrained(model)  # SD 1.x/2.x or SDXL
    components = {"lora_unet_": pipe.unet, "lora_te_": pipe.text_encoder}
    if getattr(pipe, "text_encoder_2", None) is not None:  # SDXL: kohya's lora_te1_ / lora_te2_
        components = {"lora_unet_": pipe.unet, "lora_te1_": pipe.text_encoder, "lora_te2_": pipe.text_encoder_2}
    base = {prefix: {k: v.clone() for k, v in m.state_dict().items()} for prefix, m in components.items()}
    tensors = load_file(lora)

    # Burnbooth's merge, done here by hand from the file.
    expected = {prefix: dict(weights) for prefix, weights in base.items()}
    modules = sorted({k.split(".")[0] for k in tensors})
    for module in modules:
        prefix = next(p for p in components if module.startswith(p))
        by_kohya = kohya_names(prefix, base[prefix], pipe.unet.config)
        down, up = tensors[f"{module}.lora_down.weight"], tensors[f"{module}.lora_up.weight"]
        alpha = float(tensors[f"{module}.alpha"])
        key = by_kohya[module]
        # Convolutions (LoCon) hold 4-d pairs: the product is over the flattened kernels.
        delta = (up.flatten(1) @ down.flatten(1)).reshape(base[prefix][key].shape)
        expected[prefix][key] = base[prefix][key] + (alpha / down.shape[0]) * delta

    sample = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ids = pipe.tokenizer(["a photograph of zwxrobot"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    sdxl = pipe.unet.config.addition_embed_type == "text_time"
    with torch.no_grad():
        def outputs():
            if sdxl:
                first = pipe.text_encoder(ids, output_hidden_states=True)
                second = pipe.text_encoder_2(ids, output_hidden_states=True)
                context = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
                added = {"text_embeds": second.text_embeds, "time_ids": torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]])}
                return context, pipe.unet(sample, 500, context, added_cond_kwargs=added).sample
            context = pipe.text_encoder(ids)[0]
            return context, pipe.unet(sample, 500, context).sample
        text_base, out_base = outputs()
        pipe.load_lora_weights(lora)
        text_lora, out_lora = outputs()
        pipe.fuse_lora()
        pipe.unload_lora_weights()
        fused = {prefix: m.state_dict() for prefix, m in components.items()}
        for prefix, m in components.items():
            m.load_state_dict(expected[prefix])
        text_expected, out_expected = outputs()

    weight_error = max((fused[p][k] - expected[p][k]).abs().max().item() for p in components for k in expected[p])
    changed = sum(1 for p in components for k in expected[p] if not torch.equal(expected[p][k], base[p][k]))
    text_modules = sum(1 for m in modules if m.startswith("lora_te"))
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()
    print(f"{len(modules)} LoRA modules ({text_modules} in the text encoder), {changed} weights changed")
    print(f"fused weights vs W + alpha/r*up@down: max abs error {weight_error:.3e}")
    print(f"text encoder output with the LoRA (diffusers) vs merged by hand: relative L2 error {rel(text_lora, text_expected):.3e}; moved {rel(text_lora, text_base):.3e}")
    print(f"UNet output with the LoRA (diffusers) vs merged by hand: relative L2 error {rel(out_lora, out_expected):.3e}; moved {rel(out_lora, out_base):.3e}")
    # SDXL's first encoder feeds the UNet from its penultimate layer, so its
    # last layer's adapters get no gradient and stay zero.
    nonzero = sum(1 for m in modules if tensors[f"{m}.lora_up.weight"].abs().max() > 0)
    print(f"{nonzero} modules with a non-zero update")
    assert len(modules) > 0 and changed == nonzero
    assert weight_error < 1e-6 and rel(out_lora, out_expected) < 1e-5 and rel(text_lora, text_expected) < 1e-5, "diffusers applies the LoRA differently"
    print("OK: diffusers loads the Burnbooth LoRA and applies it exactly as Burnbooth merges it")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
