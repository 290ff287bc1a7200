"""Draws the small example dataset the repo ships (examples/dreambooth/).

The "subject" is a distinctive toy: an orange robot with a teal visor and a
yellow antenna, photographed (drawn) in different poses, sizes and
backgrounds, with a loss mask each (subject-masks/: the robot white, the
background black, for masked loss) and a caption file each (tags for
caption_shuffle). The regularisation set holds other toys of the same class.
Run once by developers; the images are committed. Needs Pillow.
"""

import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

CAPTIONS = [
    "zwxrobot, orange toy robot, standing, blue sky, studio photo",
    "zwxrobot, orange toy robot, teal visor, evening light",
    "zwxrobot, orange toy robot, tall picture, yellow antenna",
    "zwxrobot, orange toy robot, wide picture, soft shadow",
    "zwxrobot, orange toy robot, close-up, grey floor",
    "zwxrobot, orange toy robot, side light, plain background",
]

ROOT = Path(__file__).resolve().parent.parent / "examples" / "dreambooth"


def background(draw, size, rng):
    w, h = size
    top = tuple(rng.randint(120, 230) for _ in range(3))
    bottom = tuple(max(0, c - rng.randint(40, 90)) for c in top)
    for y in range(h):
        t = y / max(1, h - 1)
        draw.line([(0, y), (w, y)], fill=tuple(int(a + (b - a) * t) for a, b in zip(top, bottom)))
    floor = int(h * rng.uniform(0.62, 0.78))
    draw.rectangle([0, floor, w, h], fill=tuple(max(0, c - 50) for c in bottom))


def robot(draw, cx, cy, scale, tilt, body, visor, antenna):
    s = scale
    draw.rounded_rectangle([cx - 40 * s, cy - 10 * s, cx + 40 * s, cy + 70 * s], radius=12 * s, fill=body)
    draw.rounded_rectangle([cx - 32 * s + tilt, cy - 70 * s, cx + 32 * s + tilt, cy - 12 * s], radius=10 * s, fill=body)
    draw.rounded_rectangle([cx - 24 * s + tilt, cy - 56 * s, cx + 24 * s + tilt, cy - 34 * s], radius=6 * s, fill=visor)
    draw.line([cx + tilt, cy - 70 * s, cx + tilt + 6 * s, cy - 95 * s], fill=(60, 60, 60), width=max(1, int(3 * s)))
    draw.ellipse([cx + tilt - 2 * s, cy - 105 * s, cx + tilt + 14 * s, cy - 89 * s], fill=antenna)
    for dx in (-28, 16):
        draw.rectangle([cx + dx * s, cy + 70 * s, cx + (dx + 12) * s, cy + 95 * s], fill=(70, 70, 80))


def robot_pose(size, rng):
    """Where a robot stands in a picture of `size`, how large and how its head tilts: (cx, cy, scale, tilt)."""
    scale = min(size) / 300 * rng.uniform(0.8, 1.1)
    cx = size[0] / 2 + rng.uniform(-0.15, 0.15) * size[0]
    tilt = rng.uniform(-8, 8) * scale
    return cx, size[1] * 0.55, scale, tilt


def other_toy(draw, cx, cy, scale, rng):
    """Draws a bear, a block or a car in one random colour; returns (kind, colour)."""
    colour = tuple(rng.randint(30, 220) for _ in range(3))
    kind = rng.choice(["bear", "block", "car"])
    s = scale
    if kind == "bear":
        draw.ellipse([cx - 45 * s, cy - 20 * s, cx + 45 * s, cy + 80 * s], fill=colour)
        draw.ellipse([cx - 35 * s, cy - 85 * s, cx + 35 * s, cy - 15 * s], fill=colour)
        for dx in (-38, 22):
            draw.ellipse([cx + dx * s, cy - 95 * s, cx + (dx + 18) * s, cy - 77 * s], fill=colour)
    elif kind == "block":
        draw.rectangle([cx - 50 * s, cy - 50 * s, cx + 50 * s, cy + 50 * s], fill=colour)
        draw.text((cx - 6 * s, cy - 8 * s), rng.choice("ABCXYZ"), fill=(255, 255, 255))
    else:
        draw.rounded_rectangle([cx - 70 * s, cy - 10 * s, cx + 70 * s, cy + 35 * s], radius=10 * s, fill=colour)
        draw.rounded_rectangle([cx - 35 * s, cy - 45 * s, cx + 35 * s, cy - 5 * s], radius=8 * s, fill=colour)
        for dx in (-45, 45):
            draw.ellipse([cx + dx * s - 16 * s, cy + 20 * s, cx + dx * s + 16 * s, cy + 52 * s], fill=(30, 30, 30))
    return kind, colour


def save(image, path, quality=88):
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".png":
        image.save(path, optimize=True)
    else:
        image.save(path, quality=quality, optimize=True)


def main():
    rng = random.Random(1234)
    sizes = [(512, 512), (640, 480), (480, 640), (576, 432), (512, 640), (704, 512)]
    for i, size in enumerate(sizes):
        image = Image.new("RGB", size)
        draw = ImageDraw.Draw(image)
        background(draw, size, rng)
        cx, cy, scale, tilt = robot_pose(size, rng)
        robot(draw, cx, cy, scale, tilt, (235, 120, 35), (40, 190, 180), (250, 215, 40))
        image = image.filter(ImageFilter.GaussianBlur(0.6))
        suffix = ".png" if i == 5 else ".jpg"
        save(image, ROOT / "subject" / f"robot_{i + 1:02d}{suffix}")
        # The same robot in white on black, a little wider: the loss mask.
        mask = Image.new("RGB", size)
        white = (255, 255, 255)
        robot(ImageDraw.Draw(mask), cx, cy, scale, tilt, white, white, white)
        mask = mask.point(lambda v: 255 if v > 0 else 0).filter(ImageFilter.MaxFilter(9))
        save(mask, ROOT / "subject-masks" / f"robot_{i + 1:02d}.png")
        (ROOT / "subject" / f"robot_{i + 1:02d}.txt").write_text(CAPTIONS[i] + "\n")
    for i in range(10):
        size = rng.choice(sizes)
        image = Image.new("RGB", size)
        draw = ImageDraw.Draw(image)
        background(draw, size, rng)
        other_toy(draw, size[0] / 2, size[1] * 0.55, min(size) / 300, rng)
        image = image.filter(ImageFilter.GaussianBlur(0.6))
        save(image, ROOT / "regularisation" / f"toy_{i + 1:02d}.jpg")


if __name__ == "__main__":
    main()
