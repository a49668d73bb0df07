"""Datasets for the student: augmented crops of pseudo-labelled images, full images for evaluation."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from lightning_clipes.components.pseudo_mask import apply_confidence_threshold
from lightning_clipes.data.labeler_datamodule import LabeledImages
from lightning_clipes.data.voc_format import load_mask, load_rgb

IGNORE_INDEX = 255
MaskReader = Callable[[str], tuple[np.ndarray, np.ndarray]]  # image id -> (mask uint8, confidence float32)


def train_transform(
    crop_size: int, scale_range: Sequence[float] = (0.5, 1.5), hflip: bool = True, color_jitter: float = 0.3
) -> A.Compose:
    """Random scale, pad, random crop, flip, colour jitter; applied jointly to image, mask and confidence.

    Padding gives mask ``255`` (ignored by the loss) and confidence 0. The masks were computed on the
    whole, un-augmented image (method §5); only the student's input is augmented.
    """
    lo, hi = scale_range
    steps = [
        A.RandomScale(scale_limit=(lo - 1, hi - 1), interpolation=cv2.INTER_LINEAR,
                      mask_interpolation=cv2.INTER_NEAREST, p=1.0),
        A.PadIfNeeded(crop_size, crop_size, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=IGNORE_INDEX),
        A.RandomCrop(crop_size, crop_size),
    ]
    if hflip:
        steps.append(A.HorizontalFlip(p=0.5))
    if color_jitter > 0:
        j = color_jitter
        steps.append(A.ColorJitter(brightness=j, contrast=j, saturation=j, hue=min(j / 3, 0.5), p=0.8))
    return A.Compose(steps, additional_targets={"confidence": "mask"})


def to_tensor_image(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [0, 1]. Decoded images can be read-only views, which
    torch.from_numpy would warn about: such arrays are copied."""
    image = np.ascontiguousarray(image)
    if not image.flags.writeable:
        image = image.copy()
    return torch.from_numpy(image).permute(2, 0, 1).float().div_(255.0)


class PseudoLabelledCrops(Dataset):
    """Training items: an augmented crop with its confidence-thresholded mask.

    Args:
        images: the split's images (``LabeledImages``); only ids in ``ids`` are used.
        ids: the images with a mask (pseudo-labels made, or ground truth).
        read_mask: image id -> (mask (H, W) uint8, confidence (H, W) float32).
        threshold: pixels with confidence below it become 255.
        transform: albumentations pipeline over image, mask and confidence.
    Items: ``id``, ``image`` (3, h, w) float32 in [0, 1], ``mask`` (h, w) int64, ``confidence`` (h, w) float32.
    """

    def __init__(self, images: LabeledImages, ids: Sequence[str], read_mask: MaskReader, threshold: float,
                 transform: Optional[A.Compose]) -> None:
        index = {image_id: i for i, image_id in enumerate(images.ids)}
        self.paths = [images.image_paths[index[i]] for i in ids]
        self.ids = list(ids)
        self.read_mask, self.threshold, self.transform = read_mask, threshold, transform

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        image = load_rgb(self.paths[i])
        mask, confidence = self.read_mask(self.ids[i])
        if mask.shape != image.shape[:2]:
            raise ValueError(f"Mask of {self.ids[i]} is {mask.shape}, its image {image.shape[:2]}; delete the store entry to redo it.")
        mask = apply_confidence_threshold(mask, confidence, self.threshold, IGNORE_INDEX)
        if self.transform is not None:
            # albumentations keeps its own generator, copied as-is into every DataLoader worker; drawing
            # its seed from torch (seeded per worker and by seed_everything) keeps workers apart and runs repeatable
            self.transform.set_random_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
            out = self.transform(image=image, mask=mask, confidence=confidence.astype(np.float32))
            image, mask, confidence = out["image"], out["mask"], out["confidence"]
        return {
            "id": self.ids[i],
            "image": to_tensor_image(image),
            "mask": torch.from_numpy(np.ascontiguousarray(mask)).long(),
            "confidence": torch.from_numpy(np.ascontiguousarray(confidence)).float(),
        }


class FullImages(Dataset):
    """Evaluation items at full resolution: ``id``, ``image`` (3, H, W) float32 in [0, 1], ``mask`` (H, W)
    int64 ground truth (all 255 when the image has none)."""

    def __init__(self, images: LabeledImages) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        image = load_rgb(self.images.image_paths[i])
        gt_path = self.images.gt_paths[i]
        gt = load_mask(gt_path) if gt_path is not None else np.full(image.shape[:2], IGNORE_INDEX, np.uint8)
        return {"id": self.images.ids[i], "image": to_tensor_image(image), "mask": torch.from_numpy(gt).long()}


class GroundTruthReader:
    """Masks from ground truth with confidence 1 (the oracle / plumbing setting); picklable for workers."""

    def __init__(self, images: LabeledImages) -> None:
        self.paths = dict(zip(images.ids, images.gt_paths))

    def __call__(self, image_id: str) -> tuple[np.ndarray, np.ndarray]:
        mask = load_mask(self.paths[image_id])
        return mask, np.ones(mask.shape, np.float32)
