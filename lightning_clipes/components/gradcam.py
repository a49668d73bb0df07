"""Softmax-GradCAM over [present classes, background words] (method §3), batched over classes.

Numerics follow the reference closely on purpose: with weak gradients (random CLIP weights) the raw
cam is a small difference of large terms, and CAA's min-max step magnifies last-bit differences.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

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


def grad_cam_map(activation: torch.Tensor, grad: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
    """ReLU(sum_d mean_xy(G_d) * Z_d) of one row: (N, D) activation and gradient -> (h, w) float32.

    Computed in numpy on the (1, D, h, w) view that pytorch-grad-cam sees in the reference, so the
    reductions run in the same order: with weak gradients (random weights) the raw cam is a small
    difference of large terms, and the summation order shows after normalisation.
    """
    h, w = grid
    act = activation.float().reshape(1, h, w, -1).permute(0, 3, 1, 2).cpu().numpy()
    g = grad.float().reshape(1, h, w, -1).permute(0, 3, 1, 2).cpu().numpy()
    weights = np.mean(g, axis=(2, 3))  # spatial mean of dp_k/dZ per channel
    cam = (weights[:, :, None, None] * act).sum(axis=1)
    return np.maximum(cam, 0).astype(np.float32)[0]


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

    Block L runs once per image; one batched backward (``is_grads_batched``) then gives the gradient
    of every present class's probability at once, without a Python loop over classes.

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
    block = visual.transformer.resblocks[-1]
    cams, attns = [], []
    for b, lab in enumerate(labels):
        with torch.enable_grad():
            x = tokens[b : b + 1].detach()
            z = block.ln_1(x).detach().requires_grad_(True)  # GradCAM target: ln_1 of block L
            out, attn = block_forward(block, x, need_attn=True, z=z)
            pooled = visual.ln_post(out)[:, 1:].mean(dim=1)  # mean over patch tokens, not CLS
            feats = F.normalize(pooled @ visual.proj, dim=-1)
            # the image's own text set: [its present classes …, all background words]
            text = F.normalize(torch.cat([fg_text[list(lab)], bg_text], dim=0), dim=-1)
            probs = (logit_scale.exp() * feats @ text.T).softmax(dim=-1)[0, : len(lab)]
            one_hot = torch.eye(len(lab), dtype=probs.dtype, device=probs.device)
            (grad,) = torch.autograd.grad(probs, z, grad_outputs=one_hot, is_grads_batched=True)
        for k in range(len(lab)):
            cams.append(torch.from_numpy(grad_cam_map(z[0, 1:].detach(), grad[k, 0, 1:], grid)))
        attns.append(attn.detach()[0, 1:, 1:].float())
    cams = torch.stack(cams).to(tokens.device)
    # Normalised twice as the reference's pytorch-grad-cam does (per layer, then after averaging
    # layers): a no-op for real CLIP weights, but it matters when the raw cam is near the 1e-7 epsilon.
    return min_max_normalise(min_max_normalise(cams)), torch.stack(attns)
