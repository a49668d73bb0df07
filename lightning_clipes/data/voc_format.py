"""Reading and writing the PASCAL VOC 2012 layout: split lists, annotation labels, images, masks.

The layout, relative to a ``VOC2012`` folder (called ``root`` below)::

    JPEGImages/<id>.jpg                   the images
    Annotations/<id>.xml                  objects with class names (image-level labels come from here)
    SegmentationClass/<id>.png            ground-truth masks (palette PNG of class indices, 255 = ignore)
    SegmentationClassAug/<id>.png         the augmented masks (SBD), preferred when present
    ImageSets/Segmentation/<split>.txt    one image id per line

Only numpy, Pillow and the standard library are used, so this module imports without torch.
"""
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
    """An image file exists but cannot be decoded (truncated, corrupt, unknown format); the message names it."""


def voc_palette() -> list[int]:
    """The standard VOC colour map, flattened: 256 * 3 ints in [0, 255].

    Entry ``i`` spreads the bits of ``i`` over R, G, B from the most significant bit down
    (the VOC devkit's ``labelcolormap``): 0 = (0, 0, 0), 1 = (128, 0, 0), 15 = (192, 128, 128),
    255 = (224, 224, 192), the cream "ignore" colour.
    """
    palette: list[int] = []
    for i in range(256):
        r = g = b = 0
        c = i
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette += [r, g, b]
    return palette


_PALETTE = voc_palette()


def read_text(path: PathLike, what: str = "file") -> str:
    """The text of a UTF-8 file (a byte-order mark is dropped); a file in another encoding raises
    ValueError naming it and saying how to convert it."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{what.capitalize()} {path} is not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8, "
            f"e.g. iconv -f latin1 -t utf-8 {path} > fixed && mv fixed {path}."
        ) from None


def read_split(root: PathLike, split: str) -> list[str]:
    """Image ids of ``root/ImageSets/Segmentation/<split>.txt``.

    Each non-blank line contributes its first whitespace-separated token (so ``"2007_000032 1"``
    gives ``"2007_000032"``); file order is kept. Raises FileNotFoundError naming the missing file
    and the splits that do exist, or saying that ``root`` is not a VOC2012 folder.
    """
    folder = Path(root) / "ImageSets" / "Segmentation"
    path = folder / f"{split}.txt"
    if not path.is_file():
        if folder.is_dir():
            found = sorted(p.stem for p in folder.glob("*.txt"))
            hint = f"split files there: {', '.join(found) if found else 'none'}; pick one of those as the split"
        else:
            hint = (f"the folder {folder} does not exist; root must point at the VOC2012 folder "
                    "that contains JPEGImages/, Annotations/ and ImageSets/")
        raise FileNotFoundError(f"Split file {path} not found ({hint}).")
    lines = read_text(path, "split file").splitlines()
    return [line.split()[0] for line in lines if line.strip()]


def parse_labels(xml_path: PathLike, class_names: Sequence[str]) -> list[int]:
    """Image-level labels of a VOC annotation XML.

    Args:
        xml_path: ``Annotations/<id>.xml``.
        class_names: the vocabulary, e.g. ``VOC_CLASSES``; labels are 0-based indices into it.
    Returns:
        The class index of every ``<object>`` (``difficult`` ones included), in order of first
        appearance, without repeats; ``[]`` when the file lists no objects.
    Raises:
        FileNotFoundError: the file is missing. ValueError: the XML is malformed, an object has no
        ``<name>``, or a name (whitespace stripped) is not in ``class_names``.
    """
    if isinstance(class_names, str):
        raise TypeError(f"class_names must be a sequence of class names, not the single string {class_names!r}.")
    path = Path(xml_path)
    if not path.is_file():
        raise FileNotFoundError(f"Annotation {path} not found; every image of the split needs Annotations/<id>.xml.")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise ValueError(f"Annotation {path} is not valid XML ({err}); re-extract or fix the file.") from err
    index: dict[str, int] = {}
    for i, name in enumerate(class_names):
        index.setdefault(name, i)
    labels: list[int] = []
    for k, obj in enumerate(root.iter("object")):
        name_text = obj.findtext("name")
        if name_text is None:
            raise ValueError(f"Annotation {path}: <object> number {k + 1} has no <name> element.")
        name = name_text.strip()
        if name not in index:
            raise ValueError(
                f"Annotation {path} names class {name!r}, which is not in the vocabulary "
                f"{list(class_names)}; fix the annotation or pass class names that include it."
            )
        if index[name] not in labels:
            labels.append(index[name])
    return labels


def _int_image_to_uint8(arr: np.ndarray) -> np.ndarray:
    """(H, W) integers -> (H, W) uint8 by bit depth: values in [0, 65535] are 16-bit (v // 257),
    anything larger is 32-bit (negatives clipped to 0, v * 255 // (2**31 - 1))."""
    arr = arr.astype(np.int64)
    if arr.size == 0 or (arr.min() >= 0 and arr.max() <= 65535):
        return (arr // 257).astype(np.uint8)
    return (np.clip(arr, 0, 2**31 - 1) * 255 // (2**31 - 1)).astype(np.uint8)


def _to_uint8_rgb(img: Image.Image) -> np.ndarray:
    """A decoded PIL image of any common mode -> (H, W, 3) uint8 RGB."""
    if img.mode.startswith("I"):  # "I;16", "I;16B", "I;16L", "I;16N", "I" (32-bit signed)
        grey = _int_image_to_uint8(np.asarray(img))
    elif img.mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if arr.size and arr.max() <= 1:
            arr = arr * 255  # floats in [0, 1]
        grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    else:  # RGB, L, LA, P, PA, RGBA (alpha dropped), CMYK, YCbCr, 1, ...
        return np.asarray(img.convert("RGB"), dtype=np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


def load_rgb(path: PathLike) -> np.ndarray:
    """Decode an image completely to RGB.

    Args:
        path: any image Pillow reads (JPEG, PNG, ...).
    Returns:
        (H, W, 3) uint8 RGB. For RGB files this equals ``np.asarray(Image.open(path).convert("RGB"))``:
        no EXIF rotation is applied, because VOC masks follow the raw pixel layout. Grey, palette,
        RGBA/LA (alpha dropped) and CMYK go through ``convert("RGB")``; 16-bit integer images are
        scaled ``v // 257`` (0 -> 0, 257 * 100 -> 100, 65535 -> 255), 32-bit ones by ``255 / (2**31 - 1)``;
        float images are scaled by 255 when their maximum is <= 1, else clipped to [0, 255].
    Raises:
        FileNotFoundError: no such file. ImageReadError: the file cannot be decoded completely
        (a truncated JPEG/PNG raises instead of returning partial pixels). Both name the file.

    Truncated files are only detected while ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is False (Pillow's
    default); this module never changes it, but another library might.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Image {path} not found.")
    try:
        with Image.open(path) as img:
            img.load()  # decode everything now: a truncated file fails here, not later
            return _to_uint8_rgb(img)
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(f"Cannot decode image {path}: {err}. Re-download or replace this file.") from err


def load_mask(path: PathLike) -> np.ndarray:
    """Read a VOC ground-truth (or pseudo-label) mask.

    Args:
        path: a PNG in palette mode ``"P"`` (the raw indices are returned, not their colours) or
            greyscale ``"L"`` (the values); ``"1"`` gives 0/1, 16/32-bit integer masks are accepted
            when every value fits in 0..255.
    Returns:
        (H, W) uint8 class indices (255 = ignore).
    Raises:
        FileNotFoundError: no such file. ImageReadError: undecodable file.
        ValueError: a colour (RGB) mask or values above 255 (save indices, not colours).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Mask {path} not found.")
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            arr = np.array(img) if mode in ("P", "L", "1") or mode.startswith("I") else None  # writable
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(f"Cannot decode mask {path}: {err}. Re-create or replace this file.") from err
    if arr is None:
        raise ValueError(
            f"Mask {path} has image mode {mode!r}; expected a palette ('P') or greyscale ('L') PNG whose "
            "pixel values are class indices. Colour-rendered masks must be mapped back to indices first."
        )
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise ValueError(f"Mask {path} holds values in [{arr.min()}, {arr.max()}]; class indices must be 0..255.")
    return arr.astype(np.uint8)


def save_mask_png(target: Union[PathLike, BinaryIO], mask: np.ndarray, pnginfo=None) -> None:
    """Write class indices as a palette PNG with the VOC colours (255 = ignore, shown cream).

    Args:
        target: a path, or a binary file object opened for writing (e.g. a temp file for an atomic write).
        mask: (H, W) integer array with values in 0..255 (uint8 preferred), H, W >= 1.
        pnginfo: optional ``PIL.PngImagePlugin.PngInfo`` text chunks to carry (the store's entry record).
    Raises:
        ValueError: wrong shape, a non-integer dtype, or values outside 0..255.
    """
    arr = np.asarray(mask)
    if arr.ndim != 2 or 0 in arr.shape:
        raise ValueError(f"mask must be a non-empty (H, W) array of class indices, got shape {arr.shape}.")
    if arr.dtype != np.uint8:
        if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
            raise ValueError(f"mask must hold integer class indices, got dtype {arr.dtype}; round and cast it first.")
        if arr.min() < 0 or arr.max() > 255:
            raise ValueError(f"mask values must be in 0..255, got [{arr.min()}, {arr.max()}].")
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    img = Image.frombytes("P", (arr.shape[1], arr.shape[0]), arr.tobytes())
    img.putpalette(_PALETTE)
    img.save(target, format="PNG", pnginfo=pnginfo)


def ground_truth_path(root: PathLike, image_id: str) -> Optional[Path]:
    """``root/SegmentationClassAug/<id>.png`` if it exists, else ``root/SegmentationClass/<id>.png``
    if it exists, else None (no ground truth for this image)."""
    for folder in ("SegmentationClassAug", "SegmentationClass"):
        path = Path(root) / folder / f"{image_id}.png"
        if path.is_file():
            return path
    return None
