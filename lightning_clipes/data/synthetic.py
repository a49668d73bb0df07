"""A synthetic dataset in the PASCAL VOC 2012 layout, written by the package itself.

Each image is a smooth, low-contrast background (a gentle grey gradient plus mild noise) with one
or more filled axis-aligned rectangles and ellipses. Every class has its own saturated colour, so
a small network can learn colour -> class. Later shapes paint over earlier ones; the XML lists the
objects that stay visible (bounding boxes of their visible pixels) and the ground-truth PNG marks
their pixels with ``1 + VOC_CLASSES.index(name)`` (0 = background, no 255 outline). The output is
deterministic for a seed, and a few dozen small images take a fraction of a second.

``root/.synthetic_complete`` (JSON of the parameters) is written last, so ``ensure_synthetic_voc``
can tell a finished dataset from one a killed process left half-written.
"""
from __future__ import annotations

import colorsys
import contextlib
import fcntl
import inspect
import json
import os
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np
from PIL import Image

from lightning_clipes.data.voc_format import VOC_CLASSES, save_mask_png

PathLike = Union[str, os.PathLike]
MARKER = ".synthetic_complete"
_FOLDERS = ("JPEGImages", "Annotations", "SegmentationClass")

Box = tuple[int, int, int, int]  # xmin, ymin, xmax, ymax: 1-based, inclusive (as in VOC XML)


def class_colour(class_index: int) -> tuple[int, int, int]:
    """The fixed, saturated RGB colour of a VOC class (``class_index`` 0-based into VOC_CLASSES).

    Hues step around the colour wheel by the golden ratio, so any few classes get well-separated colours.
    """
    hue = (class_index * 0.381966) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.9, 0.9)
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def _draw_image(
    rng: np.random.Generator, width: int, height: int, classes: Sequence[str], max_objects: int
) -> tuple[np.ndarray, np.ndarray, list[tuple[str, Box]]]:
    """One image: (H, W, 3) uint8 RGB, (H, W) uint8 mask, and the visible objects as (name, box)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(100, 150) + rng.uniform(-10, 10, size=3)  # greyish, slightly tinted
    slope = rng.uniform(-25, 25, size=(2, 3))
    image = base + (yy[..., None] / height) * slope[0] + (xx[..., None] / width) * slope[1]
    image += rng.normal(0, 3, size=image.shape)
    instance = np.full((height, width), -1, np.int64)  # which shape owns each pixel
    shapes: list[str] = []
    for k in range(int(rng.integers(1, max_objects + 1))):
        name = classes[int(rng.integers(len(classes)))]
        ellipse = bool(rng.random() < 0.5)
        area = rng.uniform(0.1, 0.4) * width * height * (4 / np.pi if ellipse else 1.0)  # of the bounding box
        bw = int(np.clip(round(np.sqrt(area * rng.uniform(0.6, 1.6))), 2, width))
        bh = int(np.clip(round(area / bw), 2, height))
        x0, y0 = int(rng.integers(0, width - bw + 1)), int(rng.integers(0, height - bh + 1))
        if ellipse:
            cy, cx = y0 + (bh - 1) / 2, x0 + (bw - 1) / 2
            region = ((yy - cy) / (bh / 2)) ** 2 + ((xx - cx) / (bw / 2)) ** 2 <= 1
        else:
            region = (yy >= y0) & (yy < y0 + bh) & (xx >= x0) & (xx < x0 + bw)
        colour = np.array(class_colour(VOC_CLASSES.index(name)), np.float32)
        image[region] = colour + rng.normal(0, 3, size=(int(region.sum()), 3))
        instance[region] = k
        shapes.append(name)
    mask = np.zeros((height, width), np.uint8)
    objects: list[tuple[str, Box]] = []
    for k, name in enumerate(shapes):
        ys, xs = np.nonzero(instance == k)
        if len(ys) == 0:
            continue  # fully painted over by later shapes: not an object of this image any more
        mask[instance == k] = VOC_CLASSES.index(name) + 1
        objects.append((name, (int(xs.min()) + 1, int(ys.min()) + 1, int(xs.max()) + 1, int(ys.max()) + 1)))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), mask, objects


def _annotation_xml(image_id: str, width: int, height: int, objects: list[tuple[str, Box]]) -> str:
    """VOC-style annotation text: filename, size and one <object> (name, bndbox) per visible shape."""
    parts = [
        "<annotation>", "  <folder>VOC2012</folder>", f"  <filename>{image_id}.jpg</filename>",
        f"  <size><width>{width}</width><height>{height}</height><depth>3</depth></size>",
        "  <segmented>1</segmented>",
    ]
    for name, (x0, y0, x1, y1) in objects:
        parts += [
            "  <object>", f"    <name>{name}</name>", "    <pose>Unspecified</pose>",
            "    <truncated>0</truncated>", "    <difficult>0</difficult>",
            f"    <bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox>",
            "  </object>",
        ]
    return "\n".join(parts + ["</annotation>", ""])


def _params(num_train, num_val, classes, image_sizes, max_objects, seed) -> dict:
    """Validated parameters as plain JSON types (what the marker file records)."""
    if isinstance(classes, str) or not classes:
        raise ValueError(f"classes must be a non-empty sequence of VOC class names, got {classes!r}.")
    unknown = [c for c in classes if c not in VOC_CLASSES]
    if unknown:
        raise ValueError(f"classes {unknown} are not VOC class names; choose from {list(VOC_CLASSES)}.")
    sizes = [[int(w), int(h)] for w, h in image_sizes]
    if not sizes or min(min(s) for s in sizes) < 4:
        raise ValueError(f"image_sizes must be a non-empty list of (width, height) >= 4 px, got {image_sizes!r}.")
    if int(num_train) < 0 or int(num_val) < 0 or int(max_objects) < 1:
        raise ValueError(f"need num_train >= 0, num_val >= 0, max_objects >= 1; got {num_train}, {num_val}, {max_objects}.")
    return {"num_train": int(num_train), "num_val": int(num_val), "classes": [str(c) for c in classes],
            "image_sizes": sizes, "max_objects": int(max_objects), "seed": int(seed)}


def refuse_foreign_folder(root: Path, prefix: str, writer: str, kind: str) -> None:
    """Stop before overwriting split lists of a real dataset: every image in ``root/JPEGImages`` must
    start with ``prefix`` (the ids that ``writer`` gives); ``kind`` names such a folder in the message."""
    images = root / "JPEGImages"
    if images.is_dir():
        for entry in os.scandir(images):
            if not entry.name.startswith((prefix, ".")):
                raise ValueError(
                    f"{images} holds {entry.name!r}, which {writer} did not write; refusing to "
                    f"overwrite what looks like a real dataset. Point root at an empty or {kind} folder."
                )


def write_synthetic_voc(
    root: PathLike,
    num_train: int = 16,
    num_val: int = 8,
    classes: Sequence[str] = ("aeroplane", "bicycle", "bird"),
    image_sizes: Sequence[tuple[int, int]] = ((64, 48), (80, 64), (96, 96)),
    max_objects: int = 2,
    seed: int = 0,
) -> Path:
    """Write a synthetic dataset in VOC 2012 layout under ``root``.

    Args:
        root: the folder that plays ``.../VOC2012`` (created if missing).
        num_train, num_val: image counts; ids are ``synth_000000``, ``synth_000001``, ... (train first).
        classes: VOC class names to draw from (ValueError for anything else).
        image_sizes: (width, height) pairs, cycled over the images.
        max_objects: each image gets 1..max_objects shapes (at least one stays visible).
        seed: the same seed gives byte-identical XML and masks (and JPEGs, with the same libjpeg).
    Returns:
        ``Path(root)``, holding ``JPEGImages/<id>.jpg`` (quality 95), ``Annotations/<id>.xml``,
        ``SegmentationClass/<id>.png`` (VOC palette), ``ImageSets/Segmentation/{train,val}.txt`` and,
        written last, the marker ``.synthetic_complete``. Earlier ``synth_*`` files not in the new id
        list are removed. Raises ValueError when ``JPEGImages/`` holds files it did not write.
    """
    params = _params(num_train, num_val, classes, image_sizes, max_objects, seed)
    root = Path(root)
    refuse_foreign_folder(root, "synth_", "write_synthetic_voc", "synthetic")
    for sub in (*_FOLDERS, "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / MARKER).unlink(missing_ok=True)
    ids = [f"synth_{i:06d}" for i in range(params["num_train"] + params["num_val"])]
    keep = set(ids)
    for folder in _FOLDERS:  # leftovers of an earlier, larger dataset
        for path in (root / folder).glob("synth_*"):
            if path.stem not in keep:
                path.unlink()
    rng = np.random.default_rng(params["seed"])
    sizes = params["image_sizes"]
    for i, image_id in enumerate(ids):
        width, height = sizes[i % len(sizes)]
        image, mask, objects = _draw_image(rng, width, height, params["classes"], params["max_objects"])
        Image.fromarray(image).save(root / "JPEGImages" / f"{image_id}.jpg", format="JPEG", quality=95)
        save_mask_png(root / "SegmentationClass" / f"{image_id}.png", mask)
        xml = _annotation_xml(image_id, width, height, objects)
        (root / "Annotations" / f"{image_id}.xml").write_text(xml, encoding="utf-8")
    split_dir = root / "ImageSets" / "Segmentation"
    (split_dir / "train.txt").write_text("".join(f"{i}\n" for i in ids[: params["num_train"]]), encoding="utf-8")
    (split_dir / "val.txt").write_text("".join(f"{i}\n" for i in ids[params["num_train"]:]), encoding="utf-8")
    tmp = root / (MARKER + ".tmp")
    tmp.write_text(json.dumps(params, sort_keys=True), encoding="utf-8")
    os.replace(tmp, root / MARKER)
    return root


@contextlib.contextmanager
def writer_lock(root: PathLike) -> Iterator[None]:
    """Hold ``<root>.lock`` (an exclusive ``flock``) while a dataset is checked and written, so that two
    jobs that start on the same root at once write it once: the second waits, then finds it complete."""
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f"{root.name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_marker(marker: Path) -> Optional[dict]:
    """The parameters a dataset's completion marker records; None when it is missing or damaged."""
    try:
        return json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def marker_matches(marker: Path, params: dict) -> bool:
    """The dataset's completion marker records exactly ``params`` (a damaged marker counts as missing)."""
    return read_marker(marker) == params


def ensure_written(write, params_of, marker_name: str, root: PathLike, kwargs: dict, caller: str) -> Path:
    """``write(root, **kwargs)`` unless ``root/marker_name`` records ``params_of(**arguments)`` already.

    The marker is checked before and again under :func:`writer_lock`, so that jobs that start together
    write the dataset once. Unknown keywords raise TypeError naming ``caller``.
    """
    try:
        bound = inspect.signature(write).bind(root, **kwargs)
    except TypeError as err:
        raise TypeError(f"{caller}: {err}; it takes the keywords of {write.__name__}.") from err
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    arguments.pop("root")
    marker, params = Path(root) / marker_name, params_of(**arguments)
    if marker_matches(marker, params):
        return Path(root)
    with writer_lock(root):  # another job may be writing it right now
        if marker_matches(marker, params):
            return Path(root)
        return write(root, **arguments)


def ensure_synthetic_voc(root: PathLike, **kwargs) -> Path:
    """Write the dataset unless ``root`` already holds a complete one with the same parameters.

    Args:
        root, **kwargs: as for ``write_synthetic_voc`` (unknown keywords raise TypeError).
    Returns:
        ``Path(root)``.

    Only the marker is checked, not the files: when ``root/.synthetic_complete`` records the same
    parameters nothing is touched, even if an image was deleted since. A missing or unreadable marker,
    or different parameters, means a full rewrite (so a half-written dataset from a killed process is
    redone). Delete the marker to force a rewrite. Jobs that start at once on one root write it once
    (:func:`writer_lock`).
    """
    return ensure_written(write_synthetic_voc, _params, MARKER, root, kwargs, "ensure_synthetic_voc")
