"""Class-aware attention affinity, CAA (method §4).

The affinity is built once per image from the ViT's attention; each class then keeps only the
columns inside its box mask, derived from its own cam.

:func:`box_masks` and :func:`refine_cams_batched` are the batched torch versions that run on the
labeller's device (default); :func:`box_mask` and :func:`refine_cams` follow the reference's
arithmetic order class by class in numpy/CPU order and serve the parity check and the tests.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
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


def box_masks(cams: torch.Tensor, threshold: float = 0.4) -> torch.Tensor:
    """:func:`box_mask` for a stack of cams, as torch ops on their device.

    Args:
        cams: (R, h, w) float in [0, 1].
    Returns:
        (R, h, w) bool, equal to ``box_mask`` of every map. Blobs are found by propagating the
        largest pixel index through 8-connected neighbours inside the thresholded map until nothing
        changes; each blob's bounding rectangle (with the reference's edge quirk) is painted through
        a 2-D difference array.
    """
    r, h, w = cams.shape
    device = cams.device
    if r == 0 or h * w == 0:
        return torch.zeros(cams.shape, dtype=torch.bool, device=device)
    u8 = (cams.float() * 255).to(torch.uint8)  # truncation, as numpy's astype(np.uint8)
    top = u8.flatten(1).max(dim=1).values.double()
    binary = u8 > (threshold * top).floor().to(torch.uint8).view(r, 1, 1)  # int(threshold * max)
    ids = torch.arange(1, h * w + 1, device=device, dtype=torch.float32).view(1, h, w) * binary
    for step in range(h * w):  # the longest path inside a blob bounds the rounds
        grown = F.max_pool2d(ids[:, None], 3, stride=1, padding=1)[:, 0] * binary
        if step % 4 == 3 and torch.equal(grown, ids):  # compare now and then: each check is a sync
            break
        ids = grown
    label = ids.long().flatten(1)  # (R, N): 0 outside, else the blob's largest pixel index
    rows = torch.arange(h, device=device).repeat_interleave(w).expand(r, -1)
    cols = torch.arange(w, device=device).repeat(h).expand(r, -1)
    big = torch.full((r, h * w + 1), h * w, device=device, dtype=torch.long)
    small = torch.full((r, h * w + 1), -1, device=device, dtype=torch.long)
    y0 = big.scatter_reduce(1, label, rows, "amin")
    x0 = big.clone().scatter_reduce(1, label, cols, "amin")
    y1 = small.scatter_reduce(1, label, rows, "amax").add(1).clamp_max(h - 1)  # end exclusive, edge quirk
    x1 = small.clone().scatter_reduce(1, label, cols, "amax").add(1).clamp_max(w - 1)
    keep = (y1 > y0) & (x1 > x0)
    keep[:, 0] = False  # label 0 is the outside
    m, blob = keep.nonzero(as_tuple=True)
    diff = torch.zeros(r, h + 1, w + 1, device=device, dtype=torch.int32)
    ones = torch.ones(len(m), device=device, dtype=torch.int32)
    for ys, xs, sign in ((y0, x0, 1), (y0, x1, -1), (y1, x0, -1), (y1, x1, 1)):
        diff.index_put_((m, ys[m, blob], xs[m, blob]), sign * ones, accumulate=True)
    return diff.cumsum(1).cumsum(2)[:, :h, :w] > 0


def refine_cams_batched(
    cams: torch.Tensor, affinity: torch.Tensor, owner: torch.Tensor, threshold: float = 0.4
) -> torch.Tensor:
    """CAA-refined cams of a batch at grid resolution, without a loop over classes.

    Args:
        cams: (R, h, w) float32 in [0, 1], every present class of every image.
        affinity: (B, N, N) from :func:`sinkhorn_affinity`, N = h*w.
        owner: (R,) int64, the image (row of ``affinity``) each cam belongs to.
        threshold: box threshold of :func:`box_mask`.
    Returns:
        (R, h, w) float32, each map min-max normalised. ``S · (box ⊙ cam)`` equals the reference's
        ``(S with the columns outside the box zeroed) · cam`` term by term (the box is 0/1); only the
        order of the additions may differ.
    """
    r, h, w = cams.shape
    if r == 0:
        return cams.new_zeros(0, h, w)
    masked = (cams.float() * box_masks(cams, threshold)).view(r, h * w)
    batch = affinity.shape[0]
    slot = torch.zeros_like(owner)  # position of each cam among its image's cams
    for b in range(batch):
        hits = owner == b
        slot[hits] = torch.arange(int(hits.sum()), device=owner.device)
    columns = masked.new_zeros(batch, h * w, int(slot.max()) + 1)
    columns[owner, :, slot] = masked
    refined = torch.bmm(affinity.float(), columns)[owner, :, slot]  # (R, N)
    return min_max_normalise(refined.view(r, h, w))
