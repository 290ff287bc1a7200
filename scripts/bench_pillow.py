#!/usr/bin/env python3
"""Pillow's side of bench-pipeline's preprocessing benchmark.

Does what SimpleTuner does to a 4032x3024 photo for a 1024 px square centre
crop, on one thread: open, exif_transpose, convert('RGB'), Lanczos resize to
1365x1024, crop (170, 0, 1194, 1024). Files are read into memory first, so
file I/O is not timed (bench-pipeline does the same).

Usage: python3 scripts/bench_pillow.py JPEG_DIR [--count M] [--runs 3]

Prints per-run lines, then one JSON line:
{"pillow_images_per_s": x, "decode_s": y, "resize_s": z}
where decode_s and resize_s are the median totals over all files per run.
"""

import argparse
import io
import json
import os
import statistics
import sys
import time

# Pillow's decode and resize are single-threaded; keep any helper library so.
for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(name, "1")

from PIL import Image, ImageOps  # noqa: E402
import PIL  # noqa: E402

RESIZE = (1365, 1024)
CROP_BOX = (170, 0, 170 + 1024, 1024)


def prepare(data):
    """Returns (image, decode seconds, resize seconds) for one file's bytes."""
    start = time.perf_counter()
    image = Image.open(io.BytesIO(data))
    image.load()  # force the full decode here, not lazily later
    image = ImageOps.exif_transpose(image)
    image = image.convert("RGB")
    decoded = time.perf_counter()
    image = image.resize(RESIZE, Image.LANCZOS)
    image = image.crop(CROP_BOX)
    image.load()  # crop is lazy in some Pillow versions
    done = time.perf_counter()
    return image, decoded - start, done - decoded


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("jpeg_dir")
    parser.add_argument("--count", type=int, default=None, help="use the first COUNT .jpg files (sorted)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    names = sorted(n for n in os.listdir(args.jpeg_dir) if n.lower().endswith((".jpg", ".jpeg")))
    if args.count is not None:
        names = names[: args.count]
    if not names:
        sys.exit(f"no .jpg files in {args.jpeg_dir}")
    files = []
    for name in names:
        with open(os.path.join(args.jpeg_dir, name), "rb") as f:
            files.append(f.read())

    print(f"Pillow {PIL.__version__}, {len(files)} files, {args.runs} runs", flush=True)
    # One untimed warm-up image, as on the Rust side.
    image, _, _ = prepare(files[0])
    assert image.size == (1024, 1024), image.size

    decode_totals, resize_totals, totals = [], [], []
    for run in range(max(1, args.runs)):
        decode_total = resize_total = 0.0
        for data in files:
            _, decode_s, resize_s = prepare(data)
            decode_total += decode_s
            resize_total += resize_s
        total = decode_total + resize_total
        print(
            f"run {run + 1}: decode+exif_transpose+convert {decode_total:.3f} s, "
            f"resize+crop {resize_total:.3f} s, {len(files) / total:.2f} images/s",
            flush=True,
        )
        decode_totals.append(decode_total)
        resize_totals.append(resize_total)
        totals.append(total)

    print(
        json.dumps(
            {
                "pillow_images_per_s": len(files) / statistics.median(totals),
                "decode_s": statistics.median(decode_totals),
                "resize_s": statistics.median(resize_totals),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
