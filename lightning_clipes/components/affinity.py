"""Class-aware attention affinity, CAA (method §4).

The affinity is built once per image from the ViT's attention; each class then keeps only the
columns inside its box mask, derived from its own cam.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from lightning_clipes.components.gradcam import min_max_normalise

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def sinkhorn_affinity(attn: torch.Tensor, rounds: int = 3) -> torch.Tensor:
    """Attention (…, N, N) -> symmetric affinity S (…, N, N).

    ``rounds`` times: divide by column sums, then by row sums; symmetrise ``(A + Aᵀ)/2``;
    square once ``S·S``.
    """
    s = attn.float()
    for _ in range(rounds):
        s = s / s.sum(dim=-2, keepdim=True)
        s = s / s.sum(dim=-1, keepdim=True)
    s = (s + s.transpose(-1, -2)) / 2
    return s @ s


def box_mask(cam: np.ndarray, threshold: float = 0.4) -> np.ndarray:
    """Union of the bounding boxes of a cam's thresholded blobs, at grid resolution.

    Args:
        cam: (h, w) float32 in [0, 1].
        threshold: fraction of the maximum (0.4 VOC, 0.7 COCO).
    Returns:
        (h, w) bool. ``u8 = floor(cam*255)``; pixels with ``u8 > int(threshold*max(u8))`` form
        8-connected blobs (the outer contours of OpenCV's findContours; inner contours lie inside
        their outer one's box and add nothing). A blob's box spans rows ``y0 … min(y1, h-1)-1`` and
        columns ``x0 … min(x1, w-1)-1`` with y1, x1 one past the blob — so a box that touches the
        bottom or right edge loses its last row or column, a reference quirk kept for parity.
    """
    height, width = cam.shape
    u8 = (np.asarray(cam, dtype=np.float32) * 255).astype(np.uint8)
    binary = u8 > int(threshold * int(u8.max()))
    mask = np.zeros((height, width), dtype=bool)
    if not binary.any():
        return mask
    labelled, _ = ndimage.label(binary, structure=_EIGHT_CONNECTED)
    for rows, cols in ndimage.find_objects(labelled):
        mask[rows.start : min(rows.stop, height - 1), cols.start : min(cols.stop, width - 1)] = True
    return mask


def refine_cams(
    cams: torch.Tensor, affinity: torch.Tensor, threshold: float = 0.4
) -> torch.Tensor:
    """CAA-refined cams of one image at grid resolution.

    Args:
        cams: (K, h, w) float32 in [0, 1], the softmax-GradCAMs of the image's present classes.
        affinity: (N, N) from :func:`sinkhorn_affinity`, N = h*w.
        threshold: box threshold of :func:`box_mask`.
    Returns:
        (K, h, w) float32, each map min-max normalised.
    """
    k, h, w = cams.shape
    refined = []
    for cam in cams:  # K is small; this keeps the reference's exact product order
        box = torch.from_numpy(box_mask(cam.detach().cpu().numpy(), threshold)).to(cam.device, cam.dtype)
        # (S with the columns outside the box zeroed) · vec(cam). With random CLIP weights S is
        # nearly uniform and the min-max step below magnifies float noise, so the order matters.
        refined.append(torch.matmul(affinity * box.view(1, h * w), cam.reshape(h * w, 1)).view(h, w))
    return min_max_normalise(torch.stack(refined)) if refined else cams.new_zeros(0, h, w)
