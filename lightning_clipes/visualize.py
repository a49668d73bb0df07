"""Pictures: pseudo-labels (image | strongest cam | mask over the image | ground truth) and the student's
validation panels (image | ground truth | pseudo-label | prediction)."""
from __future__ import annotations

from typing import Optional

import numpy as np
from PIL import Image

from lightning_clipes.data.voc_format import voc_palette

_PALETTE = np.array(voc_palette(), dtype=np.uint8).reshape(256, 3)


def heatmap(values: np.ndarray) -> np.ndarray:
    """(H, W) float in [0, 1] -> (H, W, 3) uint8, dark blue (0) through red to yellow (1)."""
    v = np.clip(np.nan_to_num(values.astype(np.float32)), 0, 1)[..., None]
    low, mid, high = np.array([20, 20, 90.0]), np.array([220, 40, 30.0]), np.array([255, 240, 80.0])
    rgb = np.where(v < 0.5, low + (mid - low) * (v * 2), mid + (high - mid) * (v * 2 - 1))
    return rgb.astype(np.uint8)


def colour_mask(mask: np.ndarray, image: Optional[np.ndarray] = None, alpha: float = 0.6) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) VOC colours, blended over ``image`` where not background."""
    colours = _PALETTE[mask]
    if image is None:
        return colours
    blend = (alpha * colours + (1 - alpha) * image).astype(np.uint8)
    return np.where((mask == 0)[..., None], image, blend)


def label_panel(
    image: np.ndarray, cams: np.ndarray, mask: np.ndarray, gt: Optional[np.ndarray] = None, height: int = 160
) -> Image.Image:
    """One row: the image, the max over its cams, the mask over the image, and the ground truth if given.

    Args:
        image: (H, W, 3) uint8. cams: (K, H, W) in [0, 1]. mask, gt: (H, W) uint8 class indices.
        height: height of each tile in pixels.
    """
    cam_max = cams.max(axis=0) if len(cams) else np.zeros(image.shape[:2], np.float32)
    tiles = [image, heatmap(cam_max), colour_mask(mask, image)]
    if gt is not None:
        tiles.append(colour_mask(gt))
    h, w = image.shape[:2]
    width = max(1, round(w * height / max(h, 1)))
    resized = [np.asarray(Image.fromarray(t).resize((width, height), Image.NEAREST)) for t in tiles]
    return Image.fromarray(tile_row(resized))


def tile_row(tiles: list[np.ndarray], gap: int = 4) -> np.ndarray:
    """Same-height (H, W_i, 3) uint8 tiles side by side with white gaps of ``gap`` pixels."""
    spacer = np.full((tiles[0].shape[0], gap, 3), 255, np.uint8)
    row = [tiles[0]]
    for t in tiles[1:]:
        row += [spacer, t]
    return np.concatenate(row, axis=1)


def pad_to_common_size(pictures: list[np.ndarray], fill: int = 255) -> list[np.ndarray]:
    """(H_i, W_i, 3) uint8 pictures padded at the bottom and right with ``fill`` to the largest H and W.

    W&B shows a list of images logged under one key at the first one's size ("Images sizes do not
    match"), squeezing or cutting the rest; VOC's images come in many sizes.
    """
    height = max(p.shape[0] for p in pictures)
    width = max(p.shape[1] for p in pictures)
    out = []
    for p in pictures:
        canvas = np.full((height, width, *p.shape[2:]), fill, p.dtype)
        canvas[: p.shape[0], : p.shape[1]] = p
        out.append(canvas)
    return out


def image_panel(image: np.ndarray, gt: np.ndarray, pred: np.ndarray, pseudo: Optional[np.ndarray] = None) -> np.ndarray:
    """One row, image | ground truth | [pseudo-label |] prediction over the image: (H, W, 3) uint8, (H, W) uint8
    masks -> (H, 3W + 8, 3) uint8, or (H, 4W + 12, 3) with the pseudo-label (void = 255 shows in the
    palette's cream: ignored pixels of the pseudo-label)."""
    middle = [colour_mask(pseudo)] if pseudo is not None and pseudo.shape == gt.shape else []
    return tile_row([image, colour_mask(gt), *middle, colour_mask(pred, image)])
