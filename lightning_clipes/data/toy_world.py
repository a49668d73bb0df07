"""The toy world as a dataset in PASCAL VOC 2012 layout, small enough to train a CLIP in it.

The scenes are :mod:`lightning_clipes.data.toy_scenes`'s. The dataset (``write_toy_world``):
``JPEGImages/toy_*.jpg``, ``Annotations/toy_*.xml`` (one ``<object>`` per visible object, plus
``<scene>`` with the background word), ``SegmentationClass/toy_*.png`` (``1 + TOY_CLASSES.index(name)``,
0 = background, VOC palette) and the splits ``ImageSets/Segmentation/{train,val,test}.txt``; image
``toy_{i:06d}`` is scene ``i``. ``ToyWorldSource`` is the world as a labeler's image source.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

from lightning_clipes.data.sources import VOCSource
from lightning_clipes.data.synthetic import _annotation_xml, ensure_written, refuse_foreign_folder
from lightning_clipes.data.toy_scenes import TOY_CLASSES, render_scene
from lightning_clipes.data.voc_format import save_mask_png

PathLike = Union[str, os.PathLike]

MARKER = ".toy_world_complete"
_FOLDERS = ("JPEGImages", "Annotations", "SegmentationClass")
_SPLITS = ("train", "val", "test")


def _params(num_train, num_val, num_test, image_size, seed) -> dict:
    """Validated parameters as plain JSON types (what the marker file records)."""
    counts = [int(num_train), int(num_val), int(num_test)]
    if min(counts) < 0:
        raise ValueError(f"need num_train, num_val, num_test >= 0; got {counts}.")
    if int(image_size) < 32:
        raise ValueError(f"image_size must be at least 32 px (objects need room), got {image_size}.")
    return {"num_train": counts[0], "num_val": counts[1], "num_test": counts[2],
            "image_size": int(image_size), "seed": int(seed)}


def split_ids(num_train: int, num_val: int, num_test: int) -> dict[str, list[str]]:
    """Image ids of each split: ``toy_000000`` … in the order train, val, test (id number = scene index)."""
    bounds = np.cumsum([0, num_train, num_val, num_test])
    return {split: [f"toy_{i:06d}" for i in range(bounds[k], bounds[k + 1])] for k, split in enumerate(_SPLITS)}


def write_toy_world(
    root: PathLike, num_train: int = 2000, num_val: int = 500, num_test: int = 500, image_size: int = 128, seed: int = 0
) -> Path:
    """Write the toy world in VOC 2012 layout under ``root`` (see the module docstring).

    Args:
        root: the folder that plays ``.../VOC2012`` (created if missing).
        num_train, num_val, num_test: images per split; scene ``i`` is ``toy_{i:06d}`` (train first).
        image_size: side of the square images in pixels.
        seed: the world; the same seed gives byte-identical XML and masks (and JPEGs, with the same libjpeg).
    Returns:
        ``Path(root)``; the marker ``.toy_world_complete`` (the parameters as JSON) is written last.
        Earlier ``toy_*`` files not in the new id list are removed. Raises ValueError when
        ``JPEGImages/`` holds files it did not write.
    """
    params = _params(num_train, num_val, num_test, image_size, seed)
    root = Path(root)
    refuse_foreign_folder(root, "toy_", "write_toy_world", "toy-world")
    for sub in (*_FOLDERS, "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / MARKER).unlink(missing_ok=True)
    splits = split_ids(params["num_train"], params["num_val"], params["num_test"])
    ids = [i for split in _SPLITS for i in splits[split]]
    keep = set(ids)
    for folder in _FOLDERS:  # leftovers of an earlier, larger world
        for path in (root / folder).glob("toy_*"):
            if path.stem not in keep:
                path.unlink()
    for index, image_id in enumerate(ids):
        scene = render_scene(params["seed"], index, params["image_size"])
        Image.fromarray(scene.image).save(root / "JPEGImages" / f"{image_id}.jpg", format="JPEG", quality=95)
        save_mask_png(root / "SegmentationClass" / f"{image_id}.png", scene.mask)
        xml = _annotation_xml(image_id, params["image_size"], params["image_size"], scene.objects)
        # the background word, for captions; VOC readers ignore the extra element
        xml = xml.replace("  <segmented>", f"  <scene>{scene.background}</scene>\n  <segmented>", 1)
        (root / "Annotations" / f"{image_id}.xml").write_text(xml, encoding="utf-8")
    for split in _SPLITS:
        text = "".join(f"{i}\n" for i in splits[split])
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text(text, encoding="utf-8")
    tmp = root / (MARKER + ".tmp")
    tmp.write_text(json.dumps(params, sort_keys=True), encoding="utf-8")
    os.replace(tmp, root / MARKER)
    return root


def ensure_toy_world(root: PathLike, **kwargs) -> Path:
    """Write the world unless ``root`` already holds a complete one with the same parameters.

    Args and return as :func:`write_toy_world`. Only the marker is checked, not the files; a missing
    or damaged marker, or different parameters, means a full rewrite. Delete the marker to force one.
    """
    return ensure_written(write_toy_world, _params, MARKER, root, kwargs, "ensure_toy_world")


class ToyWorldSource(VOCSource):
    """The toy world as an image source (``train``, ``val``, ``test``), written by :meth:`prepare`.

    ``class_names`` are ``TOY_CLASSES``; ``prompt_names`` (what the labeler puts into its templates)
    are the same words, the ones the toy CLIP's captions use.
    """

    def __init__(self, root: Union[str, Path] = "outputs/toy_world/VOC2012", num_train: int = 2000,
                 num_val: int = 500, num_test: int = 500, image_size: int = 128, seed: int = 0) -> None:
        super().__init__(root, class_names=TOY_CLASSES)
        self.prompt_names = list(TOY_CLASSES)
        self.world = {"num_train": num_train, "num_val": num_val, "num_test": num_test,
                      "image_size": image_size, "seed": seed}

    def prepare(self) -> None:
        ensure_toy_world(self.root, **self.world)

    def check(self, split: str) -> None:
        """Written by :meth:`prepare` on first use: only the split's name and size are checked."""
        if split not in _SPLITS:
            raise ValueError(f"The toy world's splits are {', '.join(_SPLITS)}; got {split!r} (--data.split).")
        if not self.world[f"num_{split}"]:
            raise ValueError(f"The toy world's {split!r} split is empty: set num_{split} above 0 (--data.num_{split}, or "
                             f"--data.source.init_args.num_{split} where the world is a data source).")
