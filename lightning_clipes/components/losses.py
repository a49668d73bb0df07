"""The confidence-guided loss (CGL, method §5) of the CLIP-ES student.

The pseudo-mask already carries the confidence: the DataModule sets every pixel whose confidence is
below the threshold (0.95 in the paper) to ``ignore_index``, as well as crop padding. The loss is then
the cross-entropy over the remaining pixels; ignored pixels contribute exactly nothing, not even a
gradient.

:func:`multi_scale_inputs_loss` is deeplab-pytorch's MSC training (``DeepLabV2_ResNet101_MSC``, the
network CLIP-ES trains its student with): the same crop also at smaller input scales, the loss summed
over each scale's logits and their pixel-wise maximum.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F


def confidence_guided_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Mean cross-entropy over the pixels of ``target`` that are not ``ignore_index``.

    Args:
        logits: (B, C, h, w) float scores; resized bilinearly (align_corners=False) to the target's
            size if it differs.
        target: (B, H, W) int64 class indices in [0, C) or ``ignore_index``.
        ignore_index: label of the pixels to leave out (low confidence, padding, void).
    Returns:
        scalar float32: sum of per-pixel losses / number of kept pixels. A batch whose pixels are all
        ignored gives 0.0 that still has a gradient graph (all-zero gradients, no NaN), so such a batch
        does not stop training or poison the weights.
    Raises:
        ValueError: wrong shapes, or a kept label outside [0, C).
    """
    if logits.ndim != 4 or target.ndim != 3 or logits.shape[0] != target.shape[0]:
        raise ValueError(
            f"Expected logits (B, C, h, w) and target (B, H, W) with the same B, got {tuple(logits.shape)} "
            f"and {tuple(target.shape)}."
        )
    if target.is_floating_point():
        raise ValueError(f"target must hold integer class indices (int64), got {target.dtype}.")
    target = target.long()
    if logits.shape[-2:] != target.shape[-2:]:
        logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
    kept = target != ignore_index
    num_classes = logits.shape[1]
    if bool(((target < 0) | (target >= num_classes))[kept].any()):
        bad = torch.unique(target[kept & ((target < 0) | (target >= num_classes))])[:10].tolist()
        raise ValueError(
            f"target holds labels {bad} outside [0, {num_classes}) that are not ignore_index={ignore_index}; "
            "check that model.num_classes matches the data (background included)."
        )
    # reduction="sum" and our own count instead of "mean": the mean divides 0 by 0 when all pixels are ignored.
    loss_sum = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum")
    return loss_sum / kept.sum().clamp_min(1)


def multi_scale_inputs_loss(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, target: torch.Tensor,
                            scales: Sequence[float], ignore_index: int = 255) -> torch.Tensor:
    """deeplab-pytorch's multi-scale-input (MSC) training loss, with the confidence-guided loss per term.

    ``model`` maps (B, 3, H, W) to (B, C, h, w) logits. The crop goes in as it is and resized bilinearly
    (align_corners=False) by each factor of ``scales`` (deeplab-pytorch: 0.5 and 0.75); the scaled
    logits are resized to the full input's logits and fused by their pixel-wise maximum. Returns the
    *sum* (as deeplab-pytorch, not the mean) of :func:`confidence_guided_loss` of the full-scale logits,
    of each scale's logits and of the fused ones. Each term resizes its logits to the target (ours;
    deeplab-pytorch shrinks the labels to each logit map with nearest neighbour instead).
    """
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"scales must be a non-empty list of positive factors, got {list(scales)}.")
    logits = model(images)
    scaled = [model(F.interpolate(images, scale_factor=s, mode="bilinear", align_corners=False)) for s in scales]
    resized = [F.interpolate(x, size=logits.shape[-2:], mode="bilinear", align_corners=False) for x in scaled]
    fused = torch.stack([logits, *resized]).amax(dim=0)
    return sum(confidence_guided_loss(x, target, ignore_index) for x in (logits, *scaled, fused))
