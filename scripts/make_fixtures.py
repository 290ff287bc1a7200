"""Builds the model fixtures for Burnbooth's parity tests (developers run
this; CI only reads what it wrote).

Writes:
- trainer-core/assets/clip-tokenizer/{vocab.json,merges.txt,tokenizer.json}:
  the standard CLIP BPE vocabulary (from the open-clip-torch wheel), used for
  single-file checkpoints, which carry no tokenizer.
- trainer-core/tests/fixtures/models/tokenizer_reference.json: token ids for
  a list of prompts (long, unicode, emoji) with both families' padding.
- trainer-core/tests/fixtures/models/sdxl/: a tiny SDXL pipeline (two text
  encoders of different widths, so the concatenation order is tested; added
  text/time conditioning) with the same kinds of references.
  `python scripts/make_fixtures.py sdxl` writes only this one.
- trainer-core/tests/fixtures/models/{sd1,sd2}/: tiny pipelines with random
  weights (seeded), in diffusers-folder layout (`diffusers/`) and as one
  single-file LDM checkpoint (`single_file.safetensors`), plus
  `reference.safetensors` with PyTorch outputs of every component and of
  whole DDIM and Euler sampling runs from given latents.

All weights are rounded to values f16 can hold, so the f16 copies hold
exactly the f32 weights. Needs: pip install torch diffusers transformers
safetensors open-clip-torch.
"""

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

import diffusers
import transformers
from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "trainer-core" / "assets" / "clip-tokenizer"
FIXTURES = ROOT / "trainer-core" / "tests" / "fixtures" / "models"

PROMPTS = [
    "a photo of sks dog",
    "",
    "A Photograph of   ZWXROBOT, standing on a table!",
    "naïve café crème brûlée, 東京タワー, Ünïcödé",
    "a cat 🐱 wearing a hat 🎩 and 👩‍🚀 emoji",
    "wow!!! so cool!? yes!",
    "it's 1234 o'clock; we'll see what's next (maybe) [really] {braces} <angle>",
    " ".join(["a very long prompt that keeps going"] * 20),
]


# ---------------------------------------------------------------- tokenizer

def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_standard_tokenizer():
    import open_clip
    bpe_path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = merges[1:49152 - 256 - 2 + 1]
    vocab = bytes_to_unicode()
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab.extend("".join(m.split()) for m in merges)
    vocab.extend(["<|startoftext|>", "<|endoftext|>"])
    ASSETS.mkdir(parents=True, exist_ok=True)
    (ASSETS / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (ASSETS / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(vocab=str(ASSETS / "vocab.json"), merges=str(ASSETS / "merges.txt"))
    assert len(vocab) == 49408
    return tokenizer


def tokenizer_for(family):
    # SD2's tokenizer pads with "!" (id 0); SD1's with <|endoftext|>.
    pad = "!" if family == "sd2" else "<|endoftext|>"
    return CLIPTokenizer(vocab=str(ASSETS / "vocab.json"), merges=str(ASSETS / "merges.txt"), pad_token=pad,
                         model_max_length=77)


def tokenizer_reference():
    out = {"prompts": PROMPTS, "max_length": 77}
    for family in ("sd1", "sd2"):
        tok = tokenizer_for(family)
        ids = tok(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
        unpadded = tok(PROMPTS, truncation=False).input_ids
        out[family] = {"pad_token_id": tok.pad_token_id, "input_ids": ids, "untruncated_lengths": [len(u) for u in unpadded]}
    return out


# ------------------------------------------------------------------ models

def round_to_f16(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.to(torch.float16).to(torch.float32))
            # Random init leaves many parameters tiny or zero (norms at 1, biases at 0):
            # give them spread so the tests see every parameter act.
        return module


def perturb(module, seed):
    """Adds noise to every parameter so no weight keeps its special init
    (zeros, ones), then rounds to f16-representable values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return round_to_f16(module)


# Sizes every tiny family shares: three UNet levels, a two-level VAE.
TINY_UNET = dict(block_out_channels=(8, 16, 16), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4)


def tiny_vae(**extra):
    return AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=4, layers_per_block=2,
                         sample_size=16, **extra)


def build(family):
    torch.manual_seed(0 if family == "sd1" else 1)
    sd2 = family == "sd2"
    unet = UNet2DConditionModel(
        **TINY_UNET,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        norm_num_groups=4,
        attention_head_dim=(2, 4, 4) if sd2 else 2,
        use_linear_projection=sd2,
        upcast_attention=sd2,
    )
    vae = tiny_vae()
    text_config = CLIPTextConfig(
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=0 if sd2 else 49407,
        hidden_size=8,
        intermediate_size=16,
        layer_norm_eps=1e-5,
        num_attention_heads=2,
        num_hidden_layers=2,
        vocab_size=49408,
        max_position_embeddings=77,
        hidden_act="gelu" if sd2 else "quick_gelu",
        projection_dim=8,
    )
    text_encoder = CLIPTextModel(text_config)
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction" if sd2 else "epsilon",
    )
    for i, m in enumerate((unet, vae, text_encoder)):
        perturb(m, 100 + i).eval()
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer_for(family), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    return pipe


# ----------------------------------------------------- single-file mapping

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def unet_to_ldm(state, config):
    lpb = config.layers_per_block
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        new = None
        if parts[0] == "time_embedding":
            new = {"linear_1": "time_embed.0", "linear_2": "time_embed.2"}[parts[1]] + "." + ".".join(parts[2:])
        elif parts[0] == "add_embedding":  # SDXL
            new = {"linear_1": "label_emb.0.0", "linear_2": "label_emb.0.2"}[parts[1]] + "." + ".".join(parts[2:])
        elif parts[0] == "conv_in":
            new = "input_blocks.0.0." + ".".join(parts[1:])
        elif parts[0] == "conv_norm_out":
            new = "out.0." + ".".join(parts[1:])
        elif parts[0] == "conv_out":
            new = "out.2." + ".".join(parts[1:])
        elif parts[0] == "down_blocks":
            i, kind = int(parts[1]), parts[2]
            if kind == "downsamplers":
                new = f"input_blocks.{(lpb + 1) * (i + 1)}.0.op." + ".".join(parts[5:])
            else:
                j = int(parts[3])
                slot = (lpb + 1) * i + j + 1
                rest = parts[4:]
                if kind == "resnets":
                    rest = [RESNET[rest[0]]] + rest[1:]
                    new = f"input_blocks.{slot}.0." + ".".join(rest)
                else:
                    new = f"input_blocks.{slot}.1." + ".".join(rest)
        elif parts[0] == "mid_block":
            kind, j, rest = parts[1], int(parts[2]), parts[3:]
            if kind == "resnets":
                new = f"middle_block.{0 if j == 0 else 2}." + ".".join([RESNET[rest[0]]] + rest[1:])
            else:
                new = "middle_block.1." + ".".join(rest)
        elif parts[0] == "up_blocks":
            i, kind = int(parts[1]), parts[2]
            has_attention = config.up_block_types[i].startswith("CrossAttn")
            if kind == "upsamplers":
                new = f"output_blocks.{(lpb + 1) * i + lpb}.{2 if has_attention else 1}.conv." + ".".join(parts[5:])
            else:
                j = int(parts[3])
                slot = (lpb + 1) * i + j
                rest = parts[4:]
                if kind == "resnets":
                    new = f"output_blocks.{slot}.0." + ".".join([RESNET[rest[0]]] + rest[1:])
                else:
                    new = f"output_blocks.{slot}.1." + ".".join(rest)
        if new is None:
            raise KeyError(key)
        out["model.diffusion_model." + new] = value
    return out


def vae_to_ldm(state, config):
    n = len(config.block_out_channels)
    out = {}
    for key, value in state.items():
        new = key
        parts = key.split(".")
        if parts[0] == "encoder" and parts[1] == "down_blocks":
            i = parts[2]
            if parts[3] == "resnets":
                new = f"encoder.down.{i}.block.{parts[4]}." + ".".join(parts[5:])
            else:
                new = f"encoder.down.{i}.downsample." + ".".join(parts[5:])
        elif parts[0] == "decoder" and parts[1] == "up_blocks":
            i = n - 1 - int(parts[2])
            if parts[3] == "resnets":
                new = f"decoder.up.{i}.block.{parts[4]}." + ".".join(parts[5:])
            else:
                new = f"decoder.up.{i}.upsample." + ".".join(parts[5:])
        elif len(parts) > 1 and parts[1] == "mid_block":
            if parts[2] == "resnets":
                new = f"{parts[0]}.mid.block_{int(parts[3]) + 1}." + ".".join(parts[4:])
            else:
                name = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}[parts[4]]
                rest = parts[6:] if parts[4] == "to_out" else parts[5:]
                new = f"{parts[0]}.mid.attn_1.{name}." + ".".join(rest)
                if name in ("q", "k", "v", "proj_out") and rest[-1] == "weight":
                    value = value[:, :, None, None]
        new = new.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        out["first_stage_model." + new] = value
    return out


def sd1_text_to_ldm(state):
    out = {"cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v for k, v in state.items()}
    # Old exports carry this int64 buffer; loaders must ignore it.
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77, dtype=torch.int64)[None]
    return out


def openclip_text_to_ldm(state, layers, hidden, seed, prefix="cond_stage_model.model.", projection=None):
    """OpenCLIP's layout. For SD2 (no `projection`), like real SD2
    checkpoints, it has one layer more than diffusers uses (diffusers drops
    the last) and a random text_projection and logit_scale, which are
    ignored. SDXL's second encoder (`projection`: transformers'
    text_projection weight) keeps every layer, and OpenCLIP stores the
    projection transposed."""
    p = prefix
    out = {}
    s = {k.removeprefix("text_model."): v for k, v in state.items()}
    out[p + "token_embedding.weight"] = s["embeddings.token_embedding.weight"]
    out[p + "positional_embedding"] = s["embeddings.position_embedding.weight"]
    extra = 1 if projection is None else 0
    for i in range(layers + extra):
        src = f"encoder.layers.{min(i, layers - 1)}."
        dst = f"{p}transformer.resblocks.{i}."
        g = 0.0 if i < layers else 0.5  # the extra layer differs, to prove it is not used
        t = lambda k: s[src + k] + g
        out[dst + "ln_1.weight"] = t("layer_norm1.weight")
        out[dst + "ln_1.bias"] = t("layer_norm1.bias")
        out[dst + "ln_2.weight"] = t("layer_norm2.weight")
        out[dst + "ln_2.bias"] = t("layer_norm2.bias")
        out[dst + "attn.in_proj_weight"] = torch.cat([t("self_attn.q_proj.weight"), t("self_attn.k_proj.weight"), t("self_attn.v_proj.weight")])
        out[dst + "attn.in_proj_bias"] = torch.cat([t("self_attn.q_proj.bias"), t("self_attn.k_proj.bias"), t("self_attn.v_proj.bias")])
        out[dst + "attn.out_proj.weight"] = t("self_attn.out_proj.weight")
        out[dst + "attn.out_proj.bias"] = t("self_attn.out_proj.bias")
        out[dst + "mlp.c_fc.weight"] = t("mlp.fc1.weight")
        out[dst + "mlp.c_fc.bias"] = t("mlp.fc1.bias")
        out[dst + "mlp.c_proj.weight"] = t("mlp.fc2.weight")
        out[dst + "mlp.c_proj.bias"] = t("mlp.fc2.bias")
    out[p + "ln_final.weight"] = s["final_layer_norm.weight"]
    out[p + "ln_final.bias"] = s["final_layer_norm.bias"]
    if projection is None:
        out[p + "text_projection"] = torch.randn(hidden, hidden, generator=torch.Generator().manual_seed(seed)).half().float()
        out[p + "logit_scale"] = torch.tensor(4.6052)
    else:
        out[p + "text_projection"] = projection.T.contiguous()
    return out


# ----------------------------------------------------------- references

def references(pipe, family):
    ref = {}
    tok = pipe.tokenizer
    g = torch.Generator().manual_seed(42)
    prompts = ["a photo of sks dog", "", PROMPTS[4]]
    ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    ref["text.input_ids"] = ids.to(torch.int64)
    with torch.no_grad():
        out = pipe.text_encoder(ids, output_hidden_states=True)
        ref["text.last_hidden_state"] = out.last_hidden_state
        if family == "sd1":
            # clip_skip=1: the penultimate layer's output through the final norm.
            ref["text.clip_skip_1"] = getattr(pipe.text_encoder, "text_model", pipe.text_encoder).final_layer_norm(out.hidden_states[-2])

        image = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
        ref["vae.input"] = image
        posterior = pipe.vae.encode(image).latent_dist
        ref["vae.posterior_mean"] = posterior.mean
        ref["vae.posterior_logvar"] = posterior.logvar
        latents = torch.randn(1, 4, 8, 8, generator=g)
        ref["vae.decode_input"] = latents
        ref["vae.decoded"] = pipe.vae.decode(latents).sample

        sample = torch.randn(2, 4, 8, 8, generator=g)
        context = torch.randn(2, 77, 8, generator=g)
        timesteps = torch.tensor([10, 981])
        ref["unet.sample"] = sample
        ref["unet.context"] = context
        ref["unet.timesteps"] = timesteps.to(torch.int64)
        ref["unet.output"] = pipe.unet(sample, timesteps, encoder_hidden_states=context).sample

    init = torch.randn(1, 4, 8, 8, generator=g)
    ref["sampling.init_latents"] = init
    run = {"prompt": "a photo of sks dog", "negative_prompt": "blurry", "steps": 5, "guidance": 7.5, "height": 16, "width": 16}
    for name, cls in (("ddim", DDIMScheduler), ("euler", EulerDiscreteScheduler)):
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
        with torch.no_grad():
            latents = pipe(run["prompt"], negative_prompt=run["negative_prompt"], num_inference_steps=run["steps"],
                           guidance_scale=run["guidance"], latents=init.clone(), height=16, width=16,
                           output_type="latent").images
            image = pipe(run["prompt"], negative_prompt=run["negative_prompt"], num_inference_steps=run["steps"],
                         guidance_scale=run["guidance"], latents=init.clone(), height=16, width=16,
                         output_type="pt").images
        ref[f"sampling.{name}.latents"] = latents
        ref[f"sampling.{name}.image"] = image  # [0, 1], NCHW
        ref[f"sampling.{name}.timesteps"] = pipe.scheduler.timesteps.to(torch.int64)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return ref, run


def write_family(family):
    pipe = build(family)
    out = FIXTURES / family
    if out.exists():
        shutil.rmtree(out)
    folder = out / "diffusers"
    # SD1's folder holds f32 weights, SD2's f16, so both dtypes are read.
    if family == "sd2":
        pipe.to(torch.float16)
        pipe.save_pretrained(folder, safe_serialization=True)
        pipe.to(torch.float32)
    else:
        pipe.save_pretrained(folder, safe_serialization=True)
    for junk in ("feature_extractor", "safety_checker"):
        shutil.rmtree(folder / junk, ignore_errors=True)
    # Like the published SD folders: vocab.json + merges.txt, no tokenizer.json.
    (folder / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(ASSETS / name, folder / "tokenizer" / name)

    single = {}
    single.update(unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config))
    single.update(vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config))
    te = pipe.text_encoder.state_dict()
    if family == "sd1":
        single.update(sd1_text_to_ldm(te))
    else:
        single.update(openclip_text_to_ldm(te, 2, 8, 7))
    dtype = torch.float16 if family == "sd1" else torch.float32
    single = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in single.items()}
    save_file(single, out / "single_file.safetensors", metadata={"format": "pt"})

    # References come from the pipeline as users load it (from the saved
    # folder): diffusers' from_config keeps a saved timestep_spacing but drops
    # one that was only a default, so an in-memory pipeline samples differently.
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), torch_dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False)
    ref, run = references(pipe, family)
    save_file({k: v.contiguous() for k, v in ref.items()}, out / "reference.safetensors")
    (out / "reference.json").write_text(json.dumps({
        "family": family, "sampling": run,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__},
    }, indent=2))

    if family == "sd1":
        # Prove the single-file layout is what diffusers itself reads.
        loaded = StableDiffusionPipeline.from_single_file(str(out / "single_file.safetensors"), config=str(folder),
                                                          torch_dtype=torch.float32, safety_checker=None)
        for name in ("unet", "vae", "text_encoder"):
            a, b = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
            for k in a:
                if k.endswith("position_ids"):
                    continue
                assert torch.equal(a[k].float(), b[k].float()), f"{name}.{k} differs after from_single_file"
        print("sd1 single file verified with diffusers.from_single_file")


def build_sdxl():
    torch.manual_seed(2)
    # TE1 is 8 wide, TE2 12: the UNet's context is their 20-channel concatenation.
    unet = UNet2DConditionModel(
        **TINY_UNET,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        cross_attention_dim=20,
        norm_num_groups=4,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 6,
    )
    vae = tiny_vae(scaling_factor=0.13025)
    common = dict(bos_token_id=49406, eos_token_id=49407, layer_norm_eps=1e-5, vocab_size=49408, max_position_embeddings=77)
    text_encoder = CLIPTextModel(CLIPTextConfig(pad_token_id=49407, hidden_size=8, intermediate_size=16, num_attention_heads=2,
                                                num_hidden_layers=3, hidden_act="quick_gelu", projection_dim=8, **common))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(pad_token_id=0, hidden_size=12, intermediate_size=20,
                                                                num_attention_heads=2, num_hidden_layers=3, hidden_act="gelu",
                                                                projection_dim=6, **common))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                                       timestep_spacing="leading")
    for i, m in enumerate((unet, vae, text_encoder, text_encoder_2)):
        perturb(m, 200 + i).eval()
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer_for("sd1"), tokenizer_2=tokenizer_for("sd2"), unet=unet,
                                     scheduler=scheduler, force_zeros_for_empty_prompt=True)


def references_sdxl(pipe):
    ref = {}
    g = torch.Generator().manual_seed(43)
    prompts = ["a photo of sks dog", "", PROMPTS[4]]
    with torch.no_grad():
        for key, tok, enc in (("text", pipe.tokenizer, pipe.text_encoder), ("text2", pipe.tokenizer_2, pipe.text_encoder_2)):
            ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            out = enc(ids, output_hidden_states=True)
            ref[f"{key}.input_ids"] = ids.to(torch.int64)
            ref[f"{key}.penultimate"] = out.hidden_states[-2]
            if key == "text2":
                ref["text2.text_embeds"] = out.text_embeds
        # No negative prompt (None, not ""): with force_zeros_for_empty_prompt the
        # unconditional input is zeros. Burnbooth's empty negative prompt means this.
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt("a photo of sks dog", negative_prompt=None,
                                                                       do_classifier_free_guidance=True)
        ref["prompt.embeds"], ref["prompt.pooled"] = embeds, pooled
        ref["prompt.negative_embeds"], ref["prompt.negative_pooled"] = negative, negative_pooled

        sample = torch.randn(2, 4, 8, 8, generator=g)
        context = torch.randn(2, 77, 20, generator=g)
        text_embeds = torch.randn(2, 6, generator=g)
        time_ids = torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0], [24.0, 20.0, 2.0, 4.0, 16.0, 16.0]])
        timesteps = torch.tensor([10, 981])
        ref["unet.sample"], ref["unet.context"], ref["unet.timesteps"] = sample, context, timesteps.to(torch.int64)
        ref["unet.text_embeds"], ref["unet.time_ids"] = text_embeds, time_ids
        ref["unet.output"] = pipe.unet(sample, timesteps, encoder_hidden_states=context,
                                       added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}).sample

    init = torch.randn(1, 4, 8, 8, generator=g)
    ref["sampling.init_latents"] = init
    # No negative prompt: SDXL's unconditional input is zeros.
    run = {"prompt": "a photo of sks dog", "negative_prompt": "", "steps": 5, "guidance": 5.0, "height": 16, "width": 16}
    euler = pipe.scheduler.config
    # SDXL ships an Euler config; DDIM made from it would take DDIM's class
    # defaults (clip_sample, set_alpha_to_one on), which SD's own DDIM configs
    # turn off and Burnbooth's DDIM does not do.
    for name, scheduler in (("ddim", DDIMScheduler.from_config(euler, clip_sample=False, set_alpha_to_one=False)),
                            ("euler", EulerDiscreteScheduler.from_config(euler))):
        pipe.scheduler = scheduler
        with torch.no_grad():
            for output_type, key in (("latent", "latents"), ("pt", "image")):
                ref[f"sampling.{name}.{key}"] = pipe(run["prompt"], negative_prompt=run["negative_prompt"] or None,
                                                     num_inference_steps=run["steps"], guidance_scale=run["guidance"],
                                                     latents=init.clone(), height=16, width=16,
                                                     output_type=output_type).images
        ref[f"sampling.{name}.timesteps"] = pipe.scheduler.timesteps.to(torch.int64)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    return ref, run


def write_sdxl():
    pipe = build_sdxl()
    out = FIXTURES / "sdxl"
    if out.exists():
        shutil.rmtree(out)
    folder = out / "diffusers"
    pipe.save_pretrained(folder, safe_serialization=True)
    for sub in ("tokenizer", "tokenizer_2"):
        (folder / sub / "tokenizer.json").unlink(missing_ok=True)
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(ASSETS / name, folder / sub / name)
    # An SGM single file (as SDXL 1.0 is published), checked with diffusers' own loader.
    te1 = pipe.text_encoder.state_dict()
    te2 = pipe.text_encoder_2.state_dict()
    single = {}
    single.update(unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config))
    single.update(vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config))
    single.update({"conditioner.embedders.0.transformer.text_model." + k.removeprefix("text_model."): v for k, v in te1.items()})
    te2_body = {k: v for k, v in te2.items() if not k.startswith("text_projection")}
    single.update(openclip_text_to_ldm(te2_body, 3, 12, 0, prefix="conditioner.embedders.1.model.",
                                       projection=te2["text_projection.weight"]))
    save_file({k: v.contiguous() for k, v in single.items()}, out / "single_file.safetensors", metadata={"format": "pt"})
    loaded = StableDiffusionXLPipeline.from_single_file(str(out / "single_file.safetensors"), config=str(folder),
                                                        torch_dtype=torch.float32)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        for k in a:
            if not k.endswith("position_ids"):
                assert torch.equal(a[k].float(), b[k].float()), f"{name}.{k} differs after from_single_file"
    print("sdxl single file verified with diffusers.from_single_file")

    pipe = StableDiffusionXLPipeline.from_pretrained(str(folder), torch_dtype=torch.float32)
    ref, run = references_sdxl(pipe)
    save_file({k: v.contiguous() for k, v in ref.items()}, out / "reference.safetensors")
    (out / "reference.json").write_text(json.dumps({
        "family": "sdxl", "sampling": run,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__},
    }, indent=2))


def main():
    import sys
    if sys.argv[1:] == ["sdxl"]:
        write_sdxl()
        print("wrote sdxl")
        return
    write_standard_tokenizer()
    FIXTURES.mkdir(parents=True, exist_ok=True)
    (FIXTURES / "tokenizer_reference.json").write_text(json.dumps(tokenizer_reference(), ensure_ascii=False, indent=1))
    for family in ("sd1", "sd2"):
        write_family(family)
        print("wrote", family)
    write_sdxl()
    print("wrote sdxl")


if __name__ == "__main__":
    main()
