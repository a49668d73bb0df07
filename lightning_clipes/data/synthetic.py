"""A synthetic dataset in VOC 2012 layout, written by the package itself.

Each image is a smooth, low-contrast background with one or more filled rectangles and ellipses;
every class has its own saturated colour, so a small network can learn colour -> class. XML
annotations list the visible objects, ground-truth PNGs mark their pixels. Deterministic for a seed.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence, Union

import numpy as np
from PIL import Image

from lightning_clipes.data.voc_format import VOC_CLASSES, save_mask_png

PathLike = Union[str, os.PathLike]
_MARKER = ".synthetic_complete"


def class_colour(class_index: int) -> tuple[int, int, int]:
    """A distinct saturated colour per VOC class index (0-based), fixed forever."""
    hue = (class_index * 0.381966) % 1.0  # golden-ratio steps around the colour wheel
    rgb = np.array(Image.new("HSV", (1, 1), (int(hue * 255), 230, 230)).convert("RGB").getpixel((0, 0)))
    return tuple(int(v) for v in rgb)


def _annotation_xml(image_id: str, width: int, height: int, objects: list[tuple[str, tuple[int, int, int, int]]]) -> str:
    parts = [
        "<annotation>", "  <folder>VOC2012</folder>", f"  <filename>{image_id}.jpg</filename>",
        f"  <size><width>{width}</width><height>{height}</height><depth>3</depth></size>",
        "  <segmented>1</segmented>",
    ]
    for name, (x0, y0, x1, y1) in objects:
        parts += [
            "  <object>", f"    <name>{name}</name>", "    <difficult>0</difficult>",
            f"    <bndbox><xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox>",
            "  </object>",
        ]
    return "\n".join(parts + ["</annotation>", ""])


def _draw_image(rng: np.random.Generator, width: int, height: int, classes: Sequence[str], max_objects: int):
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(90, 160, size=3)
    slope = rng.uniform(-30, 30, size=(2, 3))
    image = base + (yy[..., None] / max(height, 1)) * slope[0] + (xx[..., None] / max(width, 1)) * slope[1]
    image += rng.normal(0, 4, size=image.shape)
    mask = np.zeros((height, width), np.uint8)
    placed = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        name = classes[int(rng.integers(len(classes)))]
        cls = VOC_CLASSES.index(name)
        area = rng.uniform(0.1, 0.4) * width * height
        aspect = rng.uniform(0.6, 1.6)
        bw = int(np.clip(np.sqrt(area * aspect), 2, width))
        bh = int(np.clip(area / max(bw, 1), 2, height))
        x0, y0 = int(rng.integers(0, width - bw + 1)), int(rng.integers(0, height - bh + 1))
        if rng.random() < 0.5:
            region = (yy >= y0) & (yy < y0 + bh) & (xx >= x0) & (xx < x0 + bw)
        else:
            cy, cx = y0 + bh / 2 - 0.5, x0 + bw / 2 - 0.5
            region = ((yy - cy) / (bh / 2)) ** 2 + ((xx - cx) / (bw / 2)) ** 2 <= 1
        image[region] = np.array(class_colour(cls)) + rng.normal(0, 3, size=(int(region.sum()), 3))
        mask[region] = cls + 1
        placed.append((name, cls))
    objects = []
    for name, cls in placed:  # later shapes paint over earlier ones: list only what is still visible
        ys, xs = np.nonzero(mask == cls + 1)
        if len(ys) and all(n != name for n, _ in objects):
            objects.append((name, (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), mask, objects


def write_synthetic_voc(
    root: PathLike,
    num_train: int = 16,
    num_val: int = 8,
    classes: Sequence[str] = ("aeroplane", "bicycle", "bird"),
    image_sizes: Sequence[tuple[int, int]] = ((64, 48), (80, 64), (96, 96)),
    max_objects: int = 2,
    seed: int = 0,
) -> Path:
    """Write ``JPEGImages/``, ``Annotations/``, ``SegmentationClass/`` and ``ImageSets/Segmentation/{train,val}.txt``.

    Args:
        root: the folder that plays ``VOC2012``.
        classes: VOC class names to draw (index into VOC's 20 classes).
        image_sizes: (width, height) pairs, cycled over the images.
    Returns:
        ``Path(root)``; ``root/.synthetic_complete`` is written last.
    """
    unknown = [c for c in classes if c not in VOC_CLASSES]
    if unknown or not classes:
        raise ValueError(f"classes must be VOC class names, got unknown {unknown}; valid: {list(VOC_CLASSES)}")
    root = Path(root)
    for sub in ("JPEGImages", "Annotations", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / _MARKER).unlink(missing_ok=True)
    rng = np.random.default_rng(seed)
    ids = [f"synth_{i:06d}" for i in range(num_train + num_val)]
    for i, image_id in enumerate(ids):
        width, height = image_sizes[i % len(image_sizes)]
        image, mask, objects = _draw_image(rng, width, height, list(classes), max_objects)
        Image.fromarray(image).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
        save_mask_png(root / "SegmentationClass" / f"{image_id}.png", mask)
        (root / "Annotations" / f"{image_id}.xml").write_text(_annotation_xml(image_id, width, height, objects))
    (root / "ImageSets/Segmentation/train.txt").write_text("".join(f"{i}\n" for i in ids[:num_train]))
    (root / "ImageSets/Segmentation/val.txt").write_text("".join(f"{i}\n" for i in ids[num_train:]))
    params = _params(num_train, num_val, classes, image_sizes, max_objects, seed)
    (root / _MARKER).write_text(json.dumps(params))
    return root


def _params(num_train, num_val, classes, image_sizes, max_objects, seed) -> dict:
    return {"num_train": num_train, "num_val": num_val, "classes": list(classes),
            "image_sizes": [list(s) for s in image_sizes], "max_objects": max_objects, "seed": seed}


def ensure_synthetic_voc(root: PathLike, **kwargs) -> Path:
    """Write the dataset unless ``root`` already holds a complete one with the same parameters."""
    root = Path(root)
    defaults = dict(num_train=16, num_val=8, classes=("aeroplane", "bicycle", "bird"),
                    image_sizes=((64, 48), (80, 64), (96, 96)), max_objects=2, seed=0)
    defaults.update(kwargs)
    marker = root / _MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == _params(**defaults):
                return root
        except json.JSONDecodeError:
            pass
    return write_synthetic_voc(root, **defaults)
