"""Reading the COCO 2014 layout: images, image-level labels from the instances json, ground truth.

The layout, relative to the COCO folder (called ``root`` below)::

    train2014/COCO_train2014_<12-digit id>.jpg, val2014/COCO_val2014_<id>.jpg    the images
    annotations/instances_train2014.json, instances_val2014.json                the labels
    SegmentationClass/<split>/<id>.png or SegmentationClass/<id>.png            optional ground truth

Class index ``c`` (0..79) is the ``c``-th category by sorted category id (the ids run 1..90 with
gaps), so class 0 is person (id 1) and class 79 toothbrush (id 90). Ground-truth masks hold 0 for
background, ``c + 1`` for class ``c`` and 255 for ignore. Only numpy, Pillow and the standard library
are used, so this module imports without torch.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image

from lightning_clipes.data.folder_format import (
    assign_labels,
    draw_shapes,
    list_images,
    read_label_file,
    warn_unmatched,
)
from lightning_clipes.data.labeled_split import LabeledSplit
from lightning_clipes.data.voc_format import save_mask_png

PathLike = Union[str, os.PathLike]

# The 80 category names of the official instances json, in category-id order.
COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)
_MISSING_IDS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
COCO_CATEGORY_IDS: tuple[int, ...] = tuple(i for i in range(1, 91) if i not in _MISSING_IDS)
SPLIT_ALIASES = {"train": "train2014", "val": "val2014"}


def read_instances(path: PathLike) -> tuple[list[str], dict[str, list[int]]]:
    """Class names and image-level labels of a COCO instances json, in one pass over its annotations.

    Returns ``(class_names, labels)``: the category names sorted by id (COCO_CLASSES when the file has
    no ``categories``), and for every entry of ``images`` its file name -> class indices of its
    annotations, in order of first appearance in ``annotations``, no repeats, ``iscrowd`` ones
    included; ``[]`` for an image without annotations. Raises ValueError for a file that is not a
    COCO instances json or an annotation whose category or image is not listed.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = json.load(f)
        images = data["images"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a COCO instances json with an 'images' list ({err!r}).") from err
    official = [{"id": i, "name": n} for i, n in zip(COCO_CATEGORY_IDS, COCO_CLASSES)]
    categories = sorted(data.get("categories") or official, key=lambda c: c["id"])
    class_of = {c["id"]: k for k, c in enumerate(categories)}
    per_image: dict[int, list[int]] = {img["id"]: [] for img in images}
    for ann in data.get("annotations", []):  # iscrowd annotations name a present class too
        c, labels = class_of.get(ann["category_id"]), per_image.get(ann["image_id"])
        if c is None or labels is None:
            raise ValueError(f"{path}: annotation {ann.get('id')} refers to category {ann['category_id']} / image "
                             f"{ann['image_id']}, which the file's 'categories' / 'images' do not list.")
        if c not in labels:
            labels.append(c)
    return [c["name"] for c in categories], {Path(img["file_name"]).name: per_image[img["id"]] for img in images}


def _coco_id_key(path: Path) -> list[str]:
    """``COCO_train2014_000000000009.jpg`` -> ``["9"]``: label files may key images by their COCO id."""
    match = re.search(r"(\d+)$", path.stem)
    return [str(int(match.group(1)))] if match else []


def _png_stems(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    return {e.name[:-4]: Path(e.path) for e in os.scandir(folder) if e.name.lower().endswith(".png")}


def read_coco_split(
    root: PathLike,
    split: str,
    annotation_file: Optional[PathLike] = None,
    label_file: Optional[PathLike] = None,
    prompt_names: Optional[Sequence[str]] = None,
    unknown: str = "error",
) -> LabeledSplit:
    """Images of ``root/<split>/`` with image-level labels, in file-name order.

    Args:
        root: the COCO folder holding ``train2014/``, ``val2014/`` and ``annotations/``.
        split: ``train2014`` or ``val2014`` (``train`` and ``val`` are aliases); another name ``S`` reads
            ``root/S/`` and ``annotations/instances_S.json``.
        annotation_file: an instances json; default ``root/annotations/instances_<split>.json``.
        label_file: instead of the json, image-level labels as CSV (``image,labels``, labels separated
            by ``;``) or JSON (``{image: [labels]}``); images keyed by file name, stem or COCO image id,
            labels as COCO_CLASSES names or 0-based indices. ``unknown``: ``"error"`` or ``"warn"`` for
            labels that are no class (see ``folder_format.assign_labels``).
        prompt_names: CLIP prompt text per class; default CLIP-ES's COCO names with synonyms when the
            classes are COCO_CLASSES, else the category names themselves.
    Returns:
        A LabeledSplit; ids are file stems. Listed-but-missing and unlisted images are skipped with a
        warning; images without annotations are kept with ``[]``.
    """
    root, split = Path(root).expanduser(), SPLIT_ALIASES.get(split, split)
    image_dir = root / split
    if not image_dir.is_dir():
        raise FileNotFoundError(
            f"No image folder {image_dir}. root must be the COCO folder that contains train2014/ and val2014/ "
            "(the images) and annotations/instances_<split>.json; split is train2014 or val2014 (or train, val)."
        )
    if annotation_file is not None and label_file is not None:
        raise ValueError("Give either annotation_file (an instances json) or label_file (image-level labels), "
                         "not both.")
    files = list_images(image_dir)
    if label_file is not None:
        class_names = list(COCO_CLASSES)
        entries = read_label_file(label_file)
        images, labels = assign_labels(files, entries, class_names, label_file, unknown, _coco_id_key)
    else:
        default = root / "annotations" / f"instances_{split}.json"
        ann_path = Path(annotation_file) if annotation_file is not None else default
        if not ann_path.is_file():
            raise FileNotFoundError(
                f"Annotation file {ann_path} not found. Put COCO's instances_{split}.json under "
                f"{root / 'annotations'}, pass annotation_file=PATH, or pass label_file=PATH with image-level "
                "labels (CSV image,labels or JSON)."
            )
        class_names, per_file = read_instances(ann_path)
        present = {p.name for p in files}
        missing = [name for name in per_file if name not in present]
        unlisted = [p.name for p in files if p.name not in per_file]
        warn_unmatched(ann_path, image_dir, missing, unlisted, stacklevel=3)
        images = [p for p in files if p.name in per_file]
        labels = [per_file[p.name] for p in images]
    if prompt_names is None:
        if class_names == list(COCO_CLASSES):
            from lightning_clipes.components.prompts import COCO_PROMPT_NAMES  # imports torch: only when needed

            prompt_names = COCO_PROMPT_NAMES
        else:
            prompt_names = class_names
    masks = {**_png_stems(root / "SegmentationClass"), **_png_stems(root / "SegmentationClass" / split)}
    ids = [p.stem for p in images]
    return LabeledSplit(ids, labels, images, [masks.get(i) for i in ids], class_names, list(prompt_names))


SYNTHETIC_COCO_CLASSES = ("person", "car", "dog", "toothbrush")  # ids 1, 3, 18, 90 -> classes 0, 2, 16, 79
MARKER = ".synthetic_coco"


def write_synthetic_coco(root: PathLike, num_train: int = 8, num_val: int = 4, seed: int = 0) -> Path:
    """Write a tiny dataset in COCO 2014 layout under ``root`` and return ``Path(root)``.

    Images of 64x48 to 96x96 px with 1-2 coloured shapes of SYNTHETIC_COCO_CLASSES (colour by class
    index), ``annotations/instances_{train,val}2014.json`` with the real 80 categories and ids (one
    annotation per visible shape: bbox of its visible pixels, area, a box polygon, iscrowd 0) and
    ``SegmentationClass/<split>/<id>.png`` (class index + 1). Image ids are 1, 2, ... over both splits.
    Deterministic for a seed. Raises ValueError when ``root/train2014`` or ``root/val2014`` holds
    images and ``root`` is not an earlier synthetic dataset (it will not overwrite real COCO).
    """
    root = Path(root)
    occupied = any((root / s).is_dir() and any((root / s).iterdir()) for s in ("train2014", "val2014"))
    if occupied and not (root / MARKER).is_file():
        raise ValueError(f"{root} already holds COCO images that write_synthetic_coco did not write; "
                         "pick an empty folder.")
    rng = np.random.default_rng(seed)
    classes = [COCO_CLASSES.index(n) for n in SYNTHETIC_COCO_CLASSES]
    categories = [{"id": i, "name": n, "supercategory": ""} for i, n in zip(COCO_CATEGORY_IDS, COCO_CLASSES)]
    sizes, image_id, ann_id = ((64, 48), (80, 64), (96, 96)), 0, 0
    for split, count in (("train2014", num_train), ("val2014", num_val)):
        image_dir, mask_dir = root / split, root / "SegmentationClass" / split
        for folder in (image_dir, mask_dir):
            folder.mkdir(parents=True, exist_ok=True)
            for old in folder.glob(f"COCO_{split}_*"):  # leftovers of an earlier synthetic dataset
                old.unlink()
        images, annotations = [], []
        for _ in range(count):
            image_id += 1
            width, height = sizes[image_id % len(sizes)]
            name = f"COCO_{split}_{image_id:012d}"
            image, mask, shapes = draw_shapes(rng, width, height, classes)
            Image.fromarray(image).save(image_dir / f"{name}.jpg", quality=95)
            save_mask_png(mask_dir / f"{name}.png", mask)
            images.append({"id": image_id, "file_name": f"{name}.jpg", "width": width, "height": height})
            for c, (x, y, w, h), area in shapes:
                ann_id += 1
                annotations.append({
                    "id": ann_id, "image_id": image_id, "category_id": COCO_CATEGORY_IDS[c], "iscrowd": 0,
                    "bbox": [x, y, w, h], "area": area,
                    "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
                })
        (root / "annotations").mkdir(exist_ok=True)
        data = {"images": images, "annotations": annotations, "categories": categories}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data), encoding="utf-8")
    params = {"num_train": num_train, "num_val": num_val, "seed": seed}
    (root / MARKER).write_text(json.dumps(params), encoding="utf-8")
    return root
