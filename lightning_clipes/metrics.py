"""Segmentation IoU on top of torchmetrics' confusion matrix (synced across DDP ranks by torchmetrics)."""
from __future__ import annotations

import torch
from torchmetrics.classification import MulticlassConfusionMatrix


def segmentation_confmat(num_classes: int, ignore_index: int = 255) -> MulticlassConfusionMatrix:
    """A confusion-matrix metric over pixels; ``ignore_index`` pixels of the target are left out."""
    return MulticlassConfusionMatrix(num_classes=num_classes, ignore_index=ignore_index, validate_args=False)


def iou_from_confmat(confmat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class IoU and mIoU from a (C, C) confusion matrix (rows = target, cols = prediction).

    IoU_c = TP / (TP + FP + FN); a class absent from both target and prediction gets NaN and is
    left out of the mean (the VOC convention).
    """
    confmat = confmat.double()
    tp = confmat.diag()
    union = confmat.sum(0) + confmat.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
    return iou.float(), iou.nanmean().float()
