"""CLIP-ES as a plain ``nn.Module``: images + image-level labels -> class maps (method §1-§4)."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lightning_clipes.components.affinity import refine_cams, sinkhorn_affinity
from lightning_clipes.components.clip_loader import LoadedCLIP
from lightning_clipes.components.gradcam import softmax_gradcam
from lightning_clipes.components.prompts import encode_prompts
from lightning_clipes.components.vit_tokens import patch_size, preprocess, run_frozen_blocks


@dataclass
class ClassMaps:
    """Class maps of one image.

    keys: (K,) int64, 0-based foreground class indices in label order.
    cams: (K, H, W) float32 in [0, 1], CAA-refined, at the original image size.
    cams_raw: (K, H, W) float32 in [0, 1], softmax-GradCAM before CAA, at the original size.
    """

    keys: torch.Tensor
    cams: torch.Tensor
    cams_raw: torch.Tensor


class CLIPES(nn.Module):
    """Frozen CLIP + softmax-GradCAM + CAA.

    Args:
        clip: a loaded CLIP (see :func:`~lightning_clipes.components.clip_loader.load_clip`).
        class_names: foreground prompt names, index = class index (synonyms comma-separated).
        background: background words.
        templates: prompt templates with one ``{}``; several are averaged (method §1).
        box_threshold: CAA box threshold (0.4 VOC, 0.7 COCO).
        affinity_layers: how many last blocks' attention make the affinity (8 in the paper).
        sinkhorn_rounds: column/row normalisation rounds (3 in the paper).
    """

    def __init__(
        self,
        clip: LoadedCLIP,
        class_names: Sequence[str],
        background: Sequence[str],
        templates: Sequence[str],
        box_threshold: float = 0.4,
        affinity_layers: int = 8,
        sinkhorn_rounds: int = 3,
    ) -> None:
        super().__init__()
        self.clip = clip.model
        self.mean, self.std = clip.mean, clip.std
        self.class_names = list(class_names)
        self.box_threshold = box_threshold
        self.sinkhorn_rounds = sinkhorn_rounds
        depth = len(self.clip.visual.transformer.resblocks)
        if not 1 <= affinity_layers <= depth:
            raise ValueError(f"affinity_layers must be in 1…{depth} for this {depth}-block ViT, got {affinity_layers}.")
        self.affinity_layers = affinity_layers
        self.register_buffer("fg_text", encode_prompts(self.clip, clip.tokenizer, self.class_names, templates), persistent=False)
        self.register_buffer("bg_text", encode_prompts(self.clip, clip.tokenizer, list(background), templates), persistent=False)

    @property
    def patch(self) -> tuple[int, int]:
        return patch_size(self.clip.visual)

    def train(self, mode: bool = True) -> "CLIPES":
        """CLIP stays frozen in eval mode whatever the surrounding module does."""
        super().train(mode)
        self.clip.eval()
        return self

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 RGB -> (3, H', W') float32, H' and W' multiples of the patch size."""
        return preprocess(image, self.patch, self.mean, self.std)

    def forward(
        self, images: Sequence[torch.Tensor], labels: Sequence[Sequence[int]], sizes: Sequence[tuple[int, int]]
    ) -> list[ClassMaps]:
        """Class maps for a batch.

        Args:
            images: per image (3, H', W') from :meth:`preprocess`; images of the same size run together.
            labels: per image, the present class indices (0-based, order kept, at least one each).
            sizes: per image, the original (H, W) the maps are resized to.
        """
        for i, lab in enumerate(labels):
            if len(lab) == 0:
                raise ValueError(f"Image {i} of the batch has no labels; filter such images before CLIPES.")
            if len(set(lab)) != len(lab) or min(lab) < 0 or max(lab) >= len(self.class_names):
                raise ValueError(f"Image {i} has labels {list(lab)}: expected distinct indices in 0…{len(self.class_names) - 1}.")
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, img in enumerate(images):
            groups[tuple(img.shape)].append(i)
        out: list[ClassMaps] = [None] * len(images)  # type: ignore[list-item]
        # Lightning predicts under inference mode; the GradCAM backward needs ordinary tensors.
        with torch.inference_mode(False):
            for idx in groups.values():
                batch = torch.stack([images[i] for i in idx]).to(self.fg_text.device, self.fg_text.dtype)
                maps = self._forward_same_size(batch.clone(), [labels[i] for i in idx], [sizes[i] for i in idx])
                for i, m in zip(idx, maps):
                    out[i] = m
        return out

    def _forward_same_size(self, images, labels, sizes) -> list[ClassMaps]:
        visual = self.clip.visual
        depth = len(visual.transformer.resblocks)
        tokens, attns, grid = run_frozen_blocks(visual, images, attn_from=depth - self.affinity_layers)
        fg_text, bg_text = self.fg_text.clone(), self.bg_text.clone()
        cams, attn_last = softmax_gradcam(visual, self.clip.logit_scale, tokens, grid, fg_text, bg_text, labels)
        attn = torch.stack([*attns, attn_last]).mean(dim=0)  # (B, N, N), mean over the last blocks
        results, row = [], 0
        for b, lab in enumerate(labels):
            cam = cams[row : row + len(lab)]
            row += len(lab)
            refined = refine_cams(cam, sinkhorn_affinity(attn[b], self.sinkhorn_rounds), self.box_threshold)
            both = F.interpolate(torch.cat([refined, cam])[None], size=tuple(sizes[b]), mode="bilinear", align_corners=False)[0]
            results.append(ClassMaps(
                keys=torch.tensor(list(lab), dtype=torch.int64),
                cams=both[: len(lab)],
                cams_raw=both[len(lab) :],
            ))
        return results
