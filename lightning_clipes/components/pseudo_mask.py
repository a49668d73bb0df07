"""From class maps to a label map (method §5)."""
from __future__ import annotations

import numpy as np
import torch


def background_score(cams: torch.Tensor, power: float = 1.0) -> torch.Tensor:
    """``(1 - max_k cam_k) ** power``: (K, H, W) in [0, 1] -> (H, W). An image with K = 0 is all background."""
    if cams.shape[0] == 0:
        return torch.ones(cams.shape[1:], dtype=cams.dtype, device=cams.device)
    return (1 - cams.max(dim=0).values).clamp_min(0) ** power


def scores_with_background(cams: torch.Tensor, power: float = 1.0) -> torch.Tensor:
    """Stack [background, cams]: (K, H, W) -> (1 + K, H, W)."""
    return torch.cat([background_score(cams, power)[None], cams], dim=0)


def cams_to_label(cams: torch.Tensor, keys: torch.Tensor, power: float = 1.0) -> torch.Tensor:
    """Label map from an image's cams.

    Args:
        cams: (K, H, W) float in [0, 1].
        keys: (K,) int64, 0-based foreground class of each map.
        power: background exponent t (1 or 2 in the paper).
    Returns:
        (H, W) int64 with 0 = background and ``1 + keys[k]`` where map k wins the argmax.
    """
    return class_ids(scores_with_background(cams, power).argmax(dim=0), keys)


def class_ids(winner: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Channel index over [bg, cams] -> class id: 0 stays background, channel k+1 becomes ``1 + keys[k]``.

    winner: (H, W) int64 in 0…K; keys: (K,) int64. Returns (H, W) int64.
    """
    lut = torch.cat([keys.new_zeros(1), keys.to(torch.int64) + 1]).to(winner.device)
    return lut[winner]


def mask_and_confidence(cams: torch.Tensor, keys: torch.Tensor, power: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Training mask and confidence without CRF (method §5).

    The scores [bg, cams] are divided by their sum per pixel; label = argmax, confidence = the
    winning share. Returns ((H, W) int64 class ids with 0 = background, (H, W) float32 in [0, 1]).
    """
    winner, confidence = share_confidence(scores_with_background(cams, power))
    return class_ids(winner, keys), confidence


def share_confidence(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(1 + K, H, W) scores [bg, cams] -> (winner (H, W) int64 channel, confidence (H, W) float32): the
    argmax and its share of the per-pixel sum. Our confidence without the CRF; the paper defines none."""
    share = scores / scores.sum(dim=0, keepdim=True).clamp_min(1e-12)
    confidence, winner = share.max(dim=0)
    return winner, confidence.float()


def apply_confidence_threshold(mask: np.ndarray, confidence: np.ndarray, threshold: float, ignore_index: int = 255) -> np.ndarray:
    """Confidence-guided loss targets: pixels with confidence < threshold become ``ignore_index``.

    Compared in the confidence's own dtype; the store hands out float64, so ``0.95`` means 0.95 exactly.
    """
    out = np.asarray(mask).copy()
    out[np.asarray(confidence) < threshold] = ignore_index
    return out
