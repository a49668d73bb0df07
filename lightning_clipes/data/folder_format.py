"""Your own dataset: a folder of images, a label file and a class list.

The layout (names are free, the three paths are passed separately)::

    classes.txt     one class per line; synonyms after commas go into the same CLIP prompt
                    ("forklift,lift truck"); blank lines and text after '#' are ignored
    images/         *.jpg, *.jpeg, *.png, *.bmp, *.tif, *.tiff, *.webp (any case), not recursive
    labels.csv      header "image,labels"; image = file name or stem; labels separated by ';'
      or .json      {"img1.jpg": ["cat", "dog"], ...} or [{"image": "img1.jpg", "labels": [...]}, ...]
    masks/          optional ground truth <stem>.png: 0 = background, c + 1 = class c, 255 = ignore

Labels are class names (matched case-sensitively after stripping spaces) or 0-based class indices.
Only numpy, Pillow and the standard library are used, so this module imports without torch.
"""
from __future__ import annotations

import csv
import io
import json
import os
import warnings
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

import numpy as np
from PIL import Image

from lightning_clipes.data.labeled_split import LabeledSplit
from lightning_clipes.data.synthetic import class_colour
from lightning_clipes.data.voc_format import read_text, save_mask_png

PathLike = Union[str, os.PathLike]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
LabelEntry = tuple[str, list[Union[str, int]]]  # (image key as written, raw labels)


def _few(names: Sequence[str], k: int = 5) -> str:
    return ", ".join(str(n) for n in names[:k]) + (" …" if len(names) > k else "")


def _as_index(text: str) -> Optional[int]:
    """``"007"`` -> 7; None for anything that is not plain ASCII digits."""
    return int(text) if text.isascii() and text.isdigit() else None


def read_class_list(spec: Union[PathLike, Sequence[str]]) -> tuple[list[str], list[str]]:
    """Class names and CLIP prompt names from a class-list file or a list of lines.

    A line ``"forklift, lift truck"`` gives class name ``"forklift"`` and prompt ``"forklift,lift truck"``
    (synonyms stripped and joined by ``,`` as in CLIP-ES's ``"person with clothes,people,human"``).
    Returns ``(class_names, prompt_names)``; class index ``c`` is the ``c``-th class line.
    Raises FileNotFoundError (no such file) or ValueError (no classes, or duplicate class names).
    """
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"Class list {path} not found; write one class per line (synonyms after commas).")
        lines, source = read_text(path, "class list").splitlines(), str(path)
    else:
        lines, source = [str(s) for s in spec], "the class list"
    names, prompts = [], []
    for line in lines:
        words = [w.strip() for w in line.split("#", 1)[0].split(",")]
        words = [w for w in words if w]
        if words:
            names.append(words[0])
            prompts.append(",".join(words))
    if not names:
        raise ValueError(f"{source} holds no class names; give one class per line, e.g. 'forklift,lift truck'.")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{source} lists the classes {dupes} more than once; each class must appear on one line.")
    return names, prompts


def list_images(folder: PathLike) -> list[Path]:
    """Image files directly in ``folder`` (suffixes in IMAGE_SUFFIXES, any case; hidden files skipped),
    sorted by name. Raises ValueError when two files share a stem (ids are stems)."""
    paths = sorted(
        Path(e.path) for e in os.scandir(folder)
        if e.is_file() and not e.name.startswith(".") and e.name.lower().endswith(IMAGE_SUFFIXES)
    )
    stems = [p.stem for p in paths]
    clashes = sorted({p.name for p in paths if stems.count(p.stem) > 1}) if len(set(stems)) < len(stems) else []
    if clashes:
        raise ValueError(f"Images in {folder} share a file stem ({_few(clashes)}); ids are stems, "
                         "rename one of each pair.")
    return paths


def read_label_file(path: PathLike) -> list[LabelEntry]:
    """Entries ``(image key, raw labels)`` of a CSV or JSON label file, in file order.

    CSV (``.csv``): header with columns ``image`` and ``labels`` (others ignored), labels separated by ``;``.
    JSON (``.json``): ``{image: [labels]}`` or ``[{"image": ..., "labels": [...]}, ...]``; a labels
    string is split at ``;`` like in CSV. Raw labels are stripped strings or ints (indices).
    Raises FileNotFoundError or ValueError (unknown suffix, bad header, malformed JSON) naming the file.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Label file {path} not found; give a CSV (image,labels) or JSON file of labels.")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(read_text(path, "label file"), newline=""))
        reader.fieldnames = [h.strip() for h in reader.fieldnames or []]
        if "image" not in reader.fieldnames or "labels" not in reader.fieldnames:
            raise ValueError(f"Label file {path} has header {reader.fieldnames}; "
                             "the first line must be 'image,labels'.")
        pairs = [(row["image"] or "", row["labels"] or "") for row in reader]
    elif suffix == ".json":
        try:
            data = json.loads(read_text(path, "label file"))
        except json.JSONDecodeError as err:
            raise ValueError(f"Label file {path} is not valid JSON ({err}).") from err
        if isinstance(data, dict):
            pairs = list(data.items())
        elif isinstance(data, list) and all(isinstance(r, dict) and {"image", "labels"} <= r.keys() for r in data):
            pairs = [(r["image"], r["labels"]) for r in data]
        else:
            raise ValueError(f"Label file {path}: expected {{image: [labels]}} or a list of "
                             "{'image': ..., 'labels': [...]}.")
    else:
        raise ValueError(f"Label file {path}: unknown format {suffix!r}; use a .csv (image,labels) or .json file.")
    entries: list[LabelEntry] = []
    for image, labels in pairs:
        if isinstance(labels, str):
            labels = labels.split(";")
        if not isinstance(labels, list) or any(isinstance(v, bool) or not isinstance(v, (str, int)) for v in labels):
            raise ValueError(f"Label file {path}: labels of image {image!r} are {labels!r}; "
                             "expected a list of class names or indices.")
        labels = [v.strip() if isinstance(v, str) else v for v in labels]
        entries.append((str(image).strip(), [v for v in labels if v != ""]))
    return entries


def warn_unmatched(source: object, image_dir: object, missing: Sequence[str], unlisted: Sequence[str],
                   stacklevel: int = 3) -> None:
    """One warning (count and a few names) for the images ``source`` lists but ``image_dir`` lacks, one for
    the image files there that ``source`` does not list; ``stacklevel`` goes to ``warnings.warn``."""
    if missing:
        warnings.warn(f"{len(missing)} image(s) listed in {source} are not in {image_dir} and are skipped: "
                      f"{_few(missing)}", stacklevel=stacklevel)
    if unlisted:
        warnings.warn(f"{len(unlisted)} image file(s) in {image_dir} are not listed in {source} and are skipped: "
                      f"{_few(unlisted)}", stacklevel=stacklevel)


def assign_labels(
    images: Sequence[Path],
    entries: Iterable[LabelEntry],
    class_names: Sequence[str],
    source: PathLike,
    unknown: str = "error",
    extra_keys: Optional[Callable[[Path], Iterable[str]]] = None,
) -> tuple[list[Path], list[list[int]]]:
    """Match label-file entries to image files and turn labels into class indices.

    An entry's key matches an image by file name, stem or ``extra_keys(path)`` (all-digit keys also
    without leading zeros). Several entries of one image are merged. Returns the listed images (in
    ``images`` order) and their labels (order of first appearance, no repeats; ``[]`` kept).
    Warns once about listed-but-missing images and once about unlisted images; both are skipped.
    ``unknown="error"`` raises ValueError for a label that is no class, ``"warn"`` warns and drops it.
    """
    if unknown not in ("error", "warn"):
        raise ValueError(f"unknown must be 'error' or 'warn', got {unknown!r}.")
    lookup: dict[str, int] = {}
    for i, path in enumerate(images):
        for key in (path.name, path.stem, *(extra_keys(path) if extra_keys else ())):
            lookup.setdefault(key, i)
    index = {name: c for c, name in enumerate(class_names)}
    found: dict[int, list[int]] = {}
    missing, dropped = [], []
    for key, raw in entries:
        number = _as_index(key)  # COCO-style numeric ids may be written with or without leading zeros
        i = lookup.get(key, lookup.get(str(number)) if number is not None else None)
        if i is None:
            missing.append(key)
            continue
        labels = found.setdefault(i, [])
        for token in raw:
            c = token if isinstance(token, int) else index.get(token, _as_index(token))
            if c is None or not 0 <= c < len(class_names):
                if unknown == "error":
                    raise ValueError(
                        f"Label file {source}: image {key!r} has label {token!r}, which is not a class. Valid "
                        f"names: {list(class_names)} (or indices 0..{len(class_names) - 1}). Fix the label or the "
                        "class list, or set --data.source.unknown warn to drop such labels with a warning."
                    )
                dropped.append(f"{token!r} ({key})")
            elif c not in labels:
                labels.append(c)
    if dropped:
        warnings.warn(f"{len(dropped)} label(s) in {source} are not classes and were dropped: {_few(dropped)}",
                      stacklevel=3)
    unlisted = [p.name for i, p in enumerate(images) if i not in found]
    warn_unmatched(source, images[0].parent if images else "the image folder", missing, unlisted, stacklevel=4)
    kept = sorted(found)
    return [images[i] for i in kept], [found[i] for i in kept]


def read_folder_split(
    image_dir: PathLike,
    label_file: PathLike,
    classes: Union[PathLike, Sequence[str]],
    mask_dir: Optional[PathLike] = None,
    unknown: str = "error",
) -> LabeledSplit:
    """Images of ``image_dir`` with their labels from ``label_file`` (see the module docstring).

    Args:
        image_dir: the image folder. label_file: CSV or JSON labels. classes: class-list file or lines
            (see ``read_class_list``). mask_dir: optional folder of ground-truth ``<stem>.png``.
        unknown: ``"error"`` (default) or ``"warn"`` for labels that are not classes.
    Returns:
        A LabeledSplit in file-name order; ids are file stems; images without labels are kept.
    """
    class_names, prompt_names = read_class_list(classes)
    image_dir = Path(image_dir).expanduser()
    mask_dir = Path(mask_dir).expanduser() if mask_dir is not None else None
    if not image_dir.is_dir():
        raise FileNotFoundError(f"Image folder {image_dir} not found; point image_dir at the folder of images.")
    if mask_dir is not None and not Path(mask_dir).is_dir():
        raise FileNotFoundError(f"Mask folder {mask_dir} not found; leave mask_dir unset without ground truth.")
    entries = read_label_file(label_file)
    images, labels = assign_labels(list_images(image_dir), entries, class_names, label_file, unknown)
    masks = {p.stem: p for p in list_images(mask_dir) if p.suffix.lower() == ".png"} if mask_dir is not None else {}
    ids = [p.stem for p in images]
    return LabeledSplit(ids, labels, images, [masks.get(i) for i in ids], class_names, prompt_names)


def draw_shapes(
    rng: np.random.Generator, width: int, height: int, class_indices: Sequence[int], max_objects: int = 2
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, tuple[int, int, int, int], int]]]:
    """A synthetic image: grey gradient with 1..max_objects rectangles/ellipses in class colours.

    Returns (H, W, 3) uint8 RGB, (H, W) uint8 mask (``c + 1`` where class ``c`` is visible, else 0) and
    the visible shapes as ``(class index, (x, y, w, h), pixels)``: box and count of their visible pixels.
    """
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = rng.uniform(100, 150) + (yy[..., None] / height) * rng.uniform(-25, 25, 3)
    image = image + rng.normal(0, 3, (height, width, 3))
    owner = np.full((height, width), -1)
    count = int(rng.integers(1, max_objects + 1))
    shapes = [int(class_indices[int(rng.integers(len(class_indices)))]) for _ in range(count)]
    for k, c in enumerate(shapes):
        bw = int(rng.integers(width // 4, width * 3 // 4 + 1))
        bh = int(rng.integers(height // 4, height * 3 // 4 + 1))
        x0, y0 = int(rng.integers(0, width - bw + 1)), int(rng.integers(0, height - bh + 1))
        if rng.random() < 0.5:  # ellipse inscribed in the box, else the box itself
            region = ((yy - y0 - (bh - 1) / 2) / (bh / 2)) ** 2 + ((xx - x0 - (bw - 1) / 2) / (bw / 2)) ** 2 <= 1
        else:
            region = (yy >= y0) & (yy < y0 + bh) & (xx >= x0) & (xx < x0 + bw)
        image[region] = np.array(class_colour(c), np.float32)
        owner[region] = k
    mask = np.zeros((height, width), np.uint8)
    visible = []
    for k, c in enumerate(shapes):
        ys, xs = np.nonzero(owner == k)
        if len(ys):
            mask[owner == k] = c + 1
            box = (int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1))
            visible.append((c, box, len(ys)))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), mask, visible


EXAMPLE_CLASSES = ("# worked example: one class per line, synonyms after commas", "forklift,lift truck", "pallet",
                   "traffic cone,safety cone")


def write_example_folder(root: PathLike, seed: int = 0) -> tuple[Path, Path, Path]:
    """Write a tiny dataset in this layout: ``root/images/`` (6 JPEGs), ``root/labels.csv``,
    ``root/classes.txt`` (3 classes, two with synonyms) and ``root/masks/`` (ground truth).
    Returns ``(image_dir, label_file, class_file)``; the masks are in ``root/masks``."""
    root = Path(root)
    image_dir, mask_dir = root / "images", root / "masks"
    image_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(exist_ok=True)
    class_names, _ = read_class_list(EXAMPLE_CLASSES)
    rng = np.random.default_rng(seed)
    rows = ["image,labels"]
    for i in range(6):
        image, mask, shapes = draw_shapes(rng, 64 + 16 * (i % 2), 48, range(len(class_names)), max_objects=3)
        Image.fromarray(image).save(image_dir / f"site_{i:02d}.jpg", quality=95)
        save_mask_png(mask_dir / f"site_{i:02d}.png", mask)
        names = list(dict.fromkeys(class_names[c] for c, *_ in shapes))
        rows.append(f"site_{i:02d}.jpg,{';'.join(names)}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (root / "classes.txt").write_text("\n".join(EXAMPLE_CLASSES) + "\n", encoding="utf-8")
    return image_dir, root / "labels.csv", root / "classes.txt"
