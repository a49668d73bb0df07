"""Softmax-GradCAM over [present classes, background words] (method §3), batched.

Every (image, present class) pair becomes one row: the tokens from block L-1 are repeated per row,
block L runs on all rows at once, and one backward of the sum of the rows' target probabilities
gives every row its own gradient (rows do not interact). No Python loop per class.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lightning_clipes.components.vit_tokens import block_forward


def min_max_normalise(cams: torch.Tensor) -> torch.Tensor:
    """Per map: ``cam - min``, then ``/ (max + 1e-7)`` over the last two dims (method §3, §4)."""
    flat = cams.flatten(-2)
    flat = flat - flat.min(dim=-1, keepdim=True).values
    flat = flat / (flat.max(dim=-1, keepdim=True).values + 1e-7)
    return flat.view_as(cams)


def softmax_gradcam(
    visual: nn.Module,
    logit_scale: torch.Tensor,
    tokens: torch.Tensor,
    grid: tuple[int, int],
    fg_text: torch.Tensor,
    bg_text: torch.Tensor,
    labels: Sequence[Sequence[int]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """GradCAM of the softmax probability of each present class.

    Args:
        visual: the open_clip ViT (frozen).
        logit_scale: CLIP's log logit scale (a scalar tensor).
        tokens: (B, 1 + N, D) output of block L-1.
        grid: (h, w), N = h*w.
        fg_text: (C, E) unit text features of all foreground classes.
        bg_text: (M, E) unit text features of the background words.
        labels: per image, the present class indices (into ``fg_text``), order kept, no repeats.
    Returns:
        cams (R, h, w) float32 in [0, 1], R = total number of labels, rows in image then label order;
        attention (B, N, N) of block L, head-averaged, patch-to-patch.
    """
    counts = [len(lab) for lab in labels]
    image_of_row = torch.repeat_interleave(torch.arange(len(labels), device=tokens.device),
                                           torch.tensor(counts, device=tokens.device))
    block = visual.transformer.resblocks[-1]
    with torch.enable_grad():
        x = tokens.detach()[image_of_row]
        z = block.ln_1(x).detach().requires_grad_(True)  # GradCAM target: ln_1 of block L
        out, attn = block_forward(block, x, need_attn=True, z=z)
        pooled = visual.ln_post(out)[:, 1:].mean(dim=1)  # mean over patch tokens, not CLS
        feats = F.normalize(pooled @ visual.proj, dim=-1)
        scale = logit_scale.exp()
        targets = []
        row = 0
        for b, lab in enumerate(labels):  # per image: its own text set [present fg …, all bg]
            text = torch.cat([fg_text[list(lab)], bg_text], dim=0)
            probs = (scale * feats[row : row + len(lab)] @ text.T).softmax(dim=-1)
            targets.append(probs[torch.arange(len(lab)), torch.arange(len(lab))])
            row += len(lab)
        (grad,) = torch.autograd.grad(torch.cat(targets).sum(), z)
    weights = grad[:, 1:].mean(dim=1, keepdim=True)  # spatial mean of dp_k/dZ per channel
    cams = F.relu((weights * z.detach()[:, 1:]).sum(dim=-1)).view(-1, *grid)
    first_row = torch.tensor([0] + counts[:-1], device=tokens.device).cumsum(0)
    attn_last = attn.detach()[first_row, 1:, 1:].float()
    return min_max_normalise(cams.float()), attn_last
