"""Reading and writing the PASCAL VOC 2012 layout: split lists, annotation labels, images, masks."""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import BinaryIO, Optional, Sequence, Union

import numpy as np
from PIL import Image

PathLike = Union[str, os.PathLike]

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


class ImageReadError(OSError):
    """An image file exists but cannot be decoded (truncated, corrupt, unknown format)."""


def voc_palette() -> list[int]:
    """The standard VOC colour map: 256 RGB triplets flattened (index 255 = (224, 224, 192))."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


_PALETTE = voc_palette()


def read_split(root: PathLike, split: str) -> list[str]:
    """Image ids listed in ``root/ImageSets/Segmentation/<split>.txt`` (first token of each non-blank line)."""
    folder = Path(root) / "ImageSets" / "Segmentation"
    path = folder / f"{split}.txt"
    if not path.is_file():
        if folder.is_dir():
            found = sorted(p.stem for p in folder.glob("*.txt"))
            hint = f"splits found there: {', '.join(found) or 'none'}"
        else:
            hint = f"{folder} does not exist; root must be the VOC2012 folder that holds JPEGImages/"
        raise FileNotFoundError(f"Split file {path} not found ({hint}).")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def parse_labels(xml_path: PathLike, class_names: Sequence[str]) -> list[int]:
    """Image-level labels of a VOC annotation: every object's class index, first appearance order, no repeats."""
    path = Path(xml_path)
    if not path.is_file():
        raise FileNotFoundError(f"Annotation {path} not found; every image of the split needs Annotations/<id>.xml.")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise ValueError(f"Annotation {path} is not valid XML: {err}") from err
    index = {name: i for i, name in enumerate(class_names)}
    labels: list[int] = []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in index:
            raise ValueError(f"Annotation {path} names class {name!r}, which is not one of {list(class_names)}.")
        if index[name] not in labels:
            labels.append(index[name])
    return labels


def _to_uint8_rgb(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.int64)
        arr = np.clip(arr, 0, 65535) // 257  # 16-bit (also 16-bit PNGs that PIL opens as "I") to 8-bit
        return np.repeat(arr.astype(np.uint8)[:, :, None], 3, axis=2)
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        arr = arr * 255 if arr.size and arr.max() <= 1 else arr
        return np.repeat(np.clip(np.rint(arr), 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def load_rgb(path: PathLike) -> np.ndarray:
    """Decode an image fully to (H, W, 3) uint8 RGB (no EXIF rotation: VOC masks follow the raw pixels).

    Grey, palette, RGBA (alpha dropped), CMYK, 16-bit (value // 257) and float images are converted.
    Raises FileNotFoundError or ImageReadError, both naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Image {path} not found.")
    try:
        with Image.open(path) as img:
            img.load()
            return _to_uint8_rgb(img)
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(f"Cannot read image {path}: {err}") from err


def load_mask(path: PathLike) -> np.ndarray:
    """(H, W) uint8 class indices of a VOC mask PNG (palette indices, not colours)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Mask {path} not found.")
    with Image.open(path) as img:
        if img.mode not in ("P", "L"):
            img = img.convert("L")
        return np.asarray(img, dtype=np.uint8).copy()


def save_mask_png(target: Union[PathLike, BinaryIO], mask: np.ndarray) -> None:
    """Write (H, W) uint8 class indices as a VOC-palette PNG (255 = ignored, shown cream)."""
    mask = np.ascontiguousarray(mask, dtype=np.uint8)
    img = Image.frombytes("P", (mask.shape[1], mask.shape[0]), mask.tobytes())
    img.putpalette(_PALETTE)
    img.save(target, format="PNG")


def ground_truth_path(root: PathLike, image_id: str) -> Optional[Path]:
    """``SegmentationClassAug/<id>.png`` if present, else ``SegmentationClass/<id>.png``, else None."""
    for folder in ("SegmentationClassAug", "SegmentationClass"):
        path = Path(root) / folder / f"{image_id}.png"
        if path.is_file():
            return path
    return None
