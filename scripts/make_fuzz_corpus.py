"""Seed corpus for the fuzz targets of trainer-core/src/fuzz_targets.rs:
small valid inputs of every format each reader takes, written to
fuzz/corpus/<target>/. tests/fuzz_corpus.rs mutates them in every test run;
cargo-fuzz starts from them.

Needs: pip install pillow safetensors numpy. Run from the repository root:
    python scripts/make_fuzz_corpus.py
"""
import io
import json
import pathlib
import shutil
import struct

import numpy as np
from PIL import Image
from safetensors.numpy import save

ROOT = pathlib.Path("fuzz/corpus")


def target(name):
    folder = ROOT / name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def exif_orientation_block(orientation, little=True):
    """A TIFF-structured EXIF block holding one orientation tag."""
    order = "<" if little else ">"
    head = (b"II*\0" if little else b"MM\0*") + struct.pack(order + "I", 8)
    entry = struct.pack(order + "HHIHH", 0x0112, 3, 1, orientation, 0)
    return head + struct.pack(order + "H", 1) + entry + struct.pack(order + "I", 0)


images = target("image_headers")
pattern = Image.fromarray((np.arange(8 * 6 * 3).reshape(6, 8, 3) * 5 % 256).astype("uint8"))
for name, fmt, extra in [("plain.jpg", "JPEG", {}), ("plain.png", "PNG", {}), ("plain.bmp", "BMP", {}),
                         ("lossless.webp", "WEBP", {"lossless": True}), ("lossy.webp", "WEBP", {"quality": 50})]:
    buffer = io.BytesIO()
    pattern.save(buffer, fmt, **extra)
    (images / name).write_bytes(buffer.getvalue())
buffer = io.BytesIO()
pattern.save(buffer, "JPEG", exif=b"Exif\0\0" + exif_orientation_block(6))
(images / "oriented.jpg").write_bytes(buffer.getvalue())
buffer = io.BytesIO()
pattern.convert("RGBA").save(buffer, "PNG", exif=exif_orientation_block(8, little=False))
(images / "rgba-exif.png").write_bytes(buffer.getvalue())
buffer = io.BytesIO()
pattern.save(buffer, "WEBP", exif=b"Exif\0\0" + exif_orientation_block(3))
(images / "exif.webp").write_bytes(buffer.getvalue())
(images / "exif-block.tiff").write_bytes(exif_orientation_block(5))

configs = target("training_config")
for source in ["examples/dreambooth/config.env", "examples/dreambooth/tiny.env", "examples/dreambooth/sdxl.env"]:
    shutil.copy(source, configs / pathlib.Path(source).name)
(configs / "config.json").write_text(json.dumps({
    "--model_family": "sd1x", "--data_backend_config": "d.json", "learning_rate": 1e-4, "lr_scheduler": "cosine",
    "validation_prompt": "a photo of zwx", "max_train_steps": 100, "lora_rank": 8, "prediction_type": "epsilon"}, indent=1))
(configs / "config.toml").write_text('model_family = "sdxl"\ndata_backend_config = "d.json"\nlearning_rate = 1e-4\n'
                                    'train_batch_size = 2\ngradient_checkpointing = true\nvalidation_seed = 3\n')

loaders = target("dataloader_config")
for source in ["examples/dreambooth/multidatabackend-dreambooth.json", "examples/dreambooth/multidatabackend-tiny.json"]:
    shutil.copy(source, loaders / pathlib.Path(source).name)

tensors = target("safetensors")
(tensors / "two.safetensors").write_bytes(save({
    "a.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
    "b.bias": np.ones(4, dtype=np.float16)}, metadata={"format": "pt"}))
(tensors / "ids.safetensors").write_bytes(save({"ids": np.arange(5, dtype=np.int64)}))
print("wrote", ", ".join(sorted(str(p) for p in ROOT.glob("*/*"))))
