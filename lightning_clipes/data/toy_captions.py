"""The toy CLIP's training data: (image, caption) pairs drawn from the toy world on the fly.

Scenes come from :func:`lightning_clipes.data.toy_scenes.render_scene` at indices no dataset split
uses (``FIRST_CLIP_INDEX`` on for training, ``FIRST_VAL_INDEX`` on for validation), captioned as
``"a photo of a kite and a bird on sky."``; nothing is written to disk. The model that learns from
them is :class:`lightning_clipes.toy_clip.ToyCLIP`.
"""
from __future__ import annotations

import io
from typing import Optional

import lightning as L
import numpy as np
import open_clip
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from lightning_clipes.data.toy_scenes import TOY_BACKGROUNDS, TOY_CLASSES, render_background, render_scene

TOY_CLIP_NAME = "clipes-toy-ViT"  # the registered config these captions train (lightning_clipes.toy_clip.ToyCLIP)
TOY_TEMPLATE = "a photo of a {}."  # the captions' own phrasing, the labeler's template for this world
FIRST_CLIP_INDEX = 10_000_000  # scenes from here on train the CLIP; the dataset splits use 0, 1, 2, ...
FIRST_VAL_INDEX = 20_000_000


def caption(labels: list[str], background: str, rng: np.random.Generator, p_background: float = 0.8) -> str:
    """``"a photo of a kite and a bird on sky."``: the objects in random order, the background word
    with probability ``p_background``."""
    names = [f"a {n}" for n in rng.permutation(labels)]
    objects = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    where = f" on {background}" if rng.random() < p_background else ""
    return f"a photo of {objects}{where}."


def world_token_ids(tokenizer) -> torch.Tensor:
    """Sorted ids of every token the captions and the world's prompts can use (start and end included)."""
    words = [*TOY_CLASSES, *TOY_BACKGROUNDS, "a photo of a and on , ."]
    tokens = tokenizer([caption(list(TOY_CLASSES[:2]), "water", np.random.default_rng(0), 1.0), *words])
    return torch.unique(tokens[tokens != 0])


def object_crop(scene, rng: np.random.Generator, min_side: float, out_size: int):
    """A square crop of the scene around a random object pixel, ``min_side``–1 of the image's side,
    resized to ``out_size``, with the classes it shows: those with at least 40 % of their visible
    pixels (and 16 pixels) inside. None when the crop shows none."""
    size = scene.mask.shape[0]
    ys, xs = np.nonzero(scene.mask)
    if len(ys) == 0:
        return None
    k = int(rng.integers(len(ys)))
    side = int(round(size * rng.uniform(min_side, 1.0)))
    top = int(np.clip(ys[k] - rng.integers(side), 0, size - side))
    left = int(np.clip(xs[k] - rng.integers(side), 0, size - side))
    window = scene.mask[top : top + side, left : left + side]
    full, inside = np.bincount(scene.mask.ravel(), minlength=256), np.bincount(window.ravel(), minlength=256)
    labels = [TOY_CLASSES[c - 1] for c in range(1, 1 + len(TOY_CLASSES))
              if full[c] and inside[c] >= max(16, 0.4 * full[c])]
    if not labels:
        return None
    crop = Image.fromarray(scene.image[top : top + side, left : left + side]).resize((out_size, out_size), Image.BILINEAR)
    return np.asarray(crop), labels


class ToyCaptionDataset(Dataset):
    """Scenes ``first_index … first_index + length - 1`` of the world ``seed`` with their captions.

    Items: ``(image (3, S, S) float32 normalised with CLIP's mean/std, tokens (context_length,) int64,
    present (num classes,) bool: the classes the image shows)``.
    Images go through JPEG (quality 95) as the dataset's files do. The first ``low_res_items`` items
    are drawn at ``low_res_size`` instead of ``image_size`` (a cheap first phase: 4x fewer tokens at half size).
    """

    def __init__(self, seed: int, first_index: int, length: int, image_size: int, tokenizer,
                 p_background: float = 0.8, low_res_size: int = 64, low_res_items: int = 0,
                 p_home: float = 0.8, home_weight: float = 10.0, p_crop: float = 0.0, crop_min: float = 0.3,
                 p_empty: float = 0.0) -> None:
        self.seed, self.first_index, self.length = seed, first_index, length
        self.p_crop, self.crop_min, self.p_empty = p_crop, crop_min, p_empty
        self.p_home, self.home_weight = p_home, home_weight
        self.image_size, self.tokenizer, self.p_background = image_size, tokenizer, p_background
        self.low_res_size, self.low_res_items = low_res_size, low_res_items
        self.mean = np.array(OPENAI_DATASET_MEAN, np.float32) * 255
        self.std = np.array(OPENAI_DATASET_STD, np.float32) * 255

    def __len__(self) -> int:
        return self.length

    def image_and_caption(self, i: int) -> tuple[np.ndarray, list[str], str]:
        """Item ``i`` before encoding: (image (S, S, 3) uint8, the class names it shows, its caption)."""
        index = self.first_index + i
        size = self.low_res_size if i < self.low_res_items else self.image_size
        rng = np.random.default_rng([self.seed, index, 1])
        if self.p_empty > 0 and rng.random() < self.p_empty:
            kind = TOY_BACKGROUNDS[int(rng.integers(len(TOY_BACKGROUNDS)))]
            return render_background(self.seed, index, kind, size), [], TOY_TEMPLATE.format(kind)
        if self.p_crop > 0 and rng.random() < self.p_crop:
            scene = render_scene(self.seed, index, self.image_size, self.p_home, self.home_weight)
            cropped = object_crop(scene, rng, self.crop_min, size)
            if cropped is not None:
                image, labels = cropped
                return image, labels, caption(labels, scene.background, rng, self.p_background)
        scene = render_scene(self.seed, index, size, self.p_home, self.home_weight)
        return scene.image, scene.labels, caption(scene.labels, scene.background, rng, self.p_background)

    def __getitem__(self, i: int):
        image, labels, text = self.image_and_caption(i)
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=95)
        rgb = np.asarray(Image.open(buf).convert("RGB"), dtype=np.float32)
        pixels = torch.from_numpy(np.ascontiguousarray(((rgb - self.mean) / self.std).transpose(2, 0, 1)))
        present = torch.zeros(len(TOY_CLASSES), dtype=torch.bool)
        present[[TOY_CLASSES.index(n) for n in labels]] = True
        return pixels, self.tokenizer([text])[0], present


class ToyCaptionDataModule(L.LightningDataModule):
    """(image, caption) batches from the toy world for CLIP training; nothing is written to disk.

    Args:
        seed: the world (the same as the dataset's ``seed``).
        image_size: side of the images (the world's 128 by default).
        num_samples: scenes per training epoch (a fresh scene each, until the epoch repeats).
        val_samples: held-out scenes for ``val/loss`` and ``val/zero_shot_precision``.
        batch_size, num_workers: the DataLoader's.
        p_background: how often a caption names the background.
        low_res_batches, low_res_size: the first ``low_res_batches`` training batches have images of
            ``low_res_size`` px (an 8×8 grid at 64 px instead of 16×16: about 4x cheaper steps).
        p_home, home_weight: co-occurrence of classes and backgrounds in the training stream (the
            world's own: 0.8 and 10; ``1/6`` and ``1`` draw backgrounds independently).
        p_crop, crop_min: share of training images that are square crops around an object
            (``crop_min``–1 of the side, captioned with the classes they show; see :func:`object_crop`).
        p_empty: share of training images that show a background alone, captioned with the
            labeler's template (``"a photo of a wall."``): the background words CLIP-ES's softmax
            weighs the classes against then name the textures themselves.
        model_name: open_clip config whose tokenizer and context length to use.
    """

    def __init__(self, seed: int = 0, image_size: int = 128, num_samples: int = 100_000, val_samples: int = 512,
                 batch_size: int = 128, num_workers: int = 0, p_background: float = 0.8,
                 low_res_batches: int = 0, low_res_size: int = 64, p_home: float = 0.8, home_weight: float = 10.0,
                 p_crop: float = 0.0, crop_min: float = 0.3, p_empty: float = 0.0,
                 model_name: str = TOY_CLIP_NAME) -> None:
        super().__init__()
        self.seed, self.image_size = seed, image_size
        self.num_samples, self.val_samples = num_samples, val_samples
        self.batch_size, self.num_workers, self.p_background = batch_size, num_workers, p_background
        self.low_res_batches, self.low_res_size = low_res_batches, low_res_size
        self.stream = {"p_home": p_home, "home_weight": home_weight, "p_crop": p_crop, "crop_min": crop_min,
                       "p_empty": p_empty}
        self.tokenizer = open_clip.get_tokenizer(model_name)

    def setup(self, stage: Optional[str] = None) -> None:
        self.train_set = ToyCaptionDataset(self.seed, FIRST_CLIP_INDEX, self.num_samples, self.image_size,
                                           self.tokenizer, self.p_background, self.low_res_size,
                                           self.low_res_batches * self.batch_size, **self.stream)
        self.val_set = ToyCaptionDataset(self.seed, FIRST_VAL_INDEX, self.val_samples, self.image_size,
                                         self.tokenizer, self.p_background)

    def train_dataloader(self) -> DataLoader:
        # in order: every index is a fresh random scene already
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=False, drop_last=True,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)
