"""Measures a quick-start run's comparison.png (issue 21): how far each
64 px tile of the grid lies from the subject photos and the toy pictures
(on average, and from the nearest one),
and how far the trained column moved from the base model's.

Rows of the grid: the validation (instance) prompt, the class prompt;
columns: base model, trained. Distances are mean squares in [0, 1] against
each photo's centre square resized to 64 px, averaged over the photos.

Needs: pip install numpy pillow.
Run: python scripts/comparison_distances.py <run output folder>
"""

import sys
from pathlib import Path

import numpy as np
from PIL import Image

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "dreambooth"


def tiles(folder):
    result = []
    for path in sorted(folder.iterdir()):
        if path.suffix not in (".jpg", ".png"):
            continue
        image = Image.open(path).convert("RGB")
        w, h = image.size
        s = min(w, h)
        square = image.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((64, 64), Image.LANCZOS)
        result.append(np.asarray(square, np.float64) / 255)
    return result


def main():
    grid = np.asarray(Image.open(Path(sys.argv[1]) / "comparison.png").convert("RGB"), np.float64) / 255
    tile = lambda column, row: grid[64 * row:64 * row + 64, 64 * column:64 * column + 64]
    distance = lambda a, b: float(((a - b) ** 2).mean())
    mean_distance = lambda a, photos: float(np.mean([distance(a, p) for p in photos]))
    subject, toys = tiles(EXAMPLE / "subject"), tiles(EXAMPLE / "regularisation")
    base_instance, trained_instance, base_class, trained_class = tile(0, 0), tile(1, 0), tile(0, 1), tile(1, 1)
    nearest = lambda a, photos: min(distance(a, p) for p in photos)
    before, after = mean_distance(base_instance, subject), mean_distance(trained_instance, subject)
    print(f"instance prompt to the subject photos: base {before:.4f}, trained {after:.4f} (ratio {after / before:.3f})")
    before, after = nearest(base_instance, subject), nearest(trained_instance, subject)
    print(f"instance prompt to the nearest subject photo: base {before:.4f}, trained {after:.4f} (ratio {after / before:.3f})")
    print(f"class prompt to the toy pictures: base {mean_distance(base_class, toys):.4f}, trained {mean_distance(trained_class, toys):.4f}")
    moved_instance, moved_class = distance(base_instance, trained_instance), distance(base_class, trained_class)
    print(f"moved: instance {moved_instance:.4f}, class {moved_class:.4f} (ratio {moved_class / max(moved_instance, 1e-12):.3f})")


if __name__ == "__main__":
    main()
