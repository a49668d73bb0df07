"""Softmax-GradCAM over [present classes, background words] (method §3).

Two schedules of the same formula:

* :func:`softmax_gradcam` (default): block L runs once for every (image, present class) row of the
  batch, and one ordinary backward of the rows' summed scores gives every row its gradient (rows
  are independent); the channel weights and maps are reduced with torch on the device. No host
  copies. (A batched backward, ``is_grads_batched``, over the batch's largest label count ran
  Kmax x B image-backwards where this runs sum(K): on a CPU, 1.3-1.5 s against 0.8-1.2 s for 6
  VOC-sized images in one call.)
* :func:`softmax_gradcam_reference_order`: block L once per image, the reductions in numpy on
  pytorch-grad-cam's (1, D, h, w) layout, as the reference runs them. Slower; kept for the parity
  check with random weights, where the raw cam is a small difference of large terms and CAA's
  min-max step magnifies last-bit differences.
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


def _class_scores(
    visual: nn.Module, logit_scale: torch.Tensor, out: torch.Tensor, fg: torch.Tensor, present: torch.Tensor,
    bg_text: torch.Tensor, softmax: bool,
) -> torch.Tensor:
    """(B, Kmax) score of each present class: its softmax probability over [present classes, background
    words] (or its logit when ``softmax`` is False). ``fg`` (B, Kmax, E) unit text features of the
    present classes, padded; ``present`` (B, Kmax) bool marks the real ones (padding gets logit -inf)."""
    pooled = visual.ln_post(out)[:, 1:].mean(dim=1)  # mean over patch tokens, not CLS
    feats = F.normalize((pooled @ visual.proj).float(), dim=-1)
    scale = logit_scale.exp().float()
    fg_logits = scale * torch.einsum("be,bke->bk", feats, fg).masked_fill(~present, float("-inf"))
    logits = torch.cat([fg_logits, scale * feats @ bg_text.T], dim=1)
    kmax = fg.shape[1]
    return logits.softmax(dim=-1)[:, :kmax] if softmax else logits[:, :kmax]


def softmax_gradcam(
    visual: nn.Module,
    logit_scale: torch.Tensor,
    tokens: torch.Tensor,
    grid: tuple[int, int],
    fg_text: torch.Tensor,
    bg_text: torch.Tensor,
    labels: Sequence[Sequence[int]],
    softmax: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GradCAM of the softmax probability of each present class, the whole batch in one backward.

    Args:
        visual: the open_clip ViT (frozen).
        logit_scale: CLIP's log logit scale (a scalar tensor).
        tokens: (B, 1 + N, D) output of block L-1.
        grid: (h, w), N = h*w.
        fg_text: (C, E) unit text features of all foreground classes.
        bg_text: (M, E) unit text features of the background words.
        labels: per image, the present class indices (into ``fg_text``), order kept, no repeats.
        softmax: differentiate the softmax probability (CLIP-ES); ``False`` differentiates the raw
            logit instead (plain GradCAM, the paper's ablation).
    Returns:
        cams (R, h, w) float32 in [0, 1], R = total number of labels, rows in image then label order;
        attention (B, N, N) float32 of block L, head-averaged, patch-to-patch.
    """
    batch, kmax = tokens.shape[0], max(len(lab) for lab in labels)
    device = tokens.device
    index = torch.zeros(batch, kmax, dtype=torch.long)
    present = torch.zeros(batch, kmax, dtype=torch.bool)
    for b, lab in enumerate(labels):
        index[b, : len(lab)] = torch.as_tensor(list(lab), dtype=torch.long)
        present[b, : len(lab)] = True
    # one row per (image, present class), in image then label order: row r is image owner[r]'s slot[r]
    owner, slot = present.nonzero().to(device).unbind(1)
    index, present = index.to(device), present.to(device)
    fg = F.normalize(fg_text.float(), dim=-1)[index[owner]]  # (R, Kmax, E): the row's image's present classes
    bg = F.normalize(bg_text.float(), dim=-1)
    block = visual.transformer.resblocks[-1]
    with torch.enable_grad():
        x = tokens.detach()[owner]  # (R, 1 + N, D): each image once per present class
        z = block.ln_1(x).detach().requires_grad_(True)  # GradCAM target: ln_1 of block L
        out, attn = block_forward(block, x, need_attn=True, z=z)
        with torch.autocast(device.type, enabled=False):  # scores in float32 whatever the ViT ran in
            scores = _class_scores(visual, logit_scale, out.float(), fg, present[owner], bg, softmax)
        # rows are independent, so one ordinary backward of the sum gives every row d score[r, slot r] / dZ[r]
        (grad,) = torch.autograd.grad(scores.gather(1, slot[:, None]).sum(), z)
    act = z.detach()[:, 1:].float()  # (R, N, D)
    weights = grad[:, 1:].float().mean(dim=1)  # (R, D): spatial mean of d score / dZ per channel
    with torch.autocast(device.type, enabled=False):  # an autocast einsum would round the cams to bf16/fp16
        cams = torch.einsum("rd,rnd->rn", weights, act).clamp_min(0).view(-1, *grid)  # (R, h, w)
    first = torch.searchsorted(owner, torch.arange(batch, device=device))  # each image's first row
    attn = attn[first]
    # Normalised twice as the reference's pytorch-grad-cam does (per layer, then after averaging
    # layers): a no-op for real CLIP weights, but it matters when the raw cam is near the 1e-7 epsilon.
    return min_max_normalise(min_max_normalise(cams)), attn.detach()[:, 1:, 1:].float()


def grad_cam_map(activation: torch.Tensor, grad: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
    """ReLU(sum_d mean_xy(G_d) * Z_d) of one row: (N, D) activation and gradient -> (h, w) float32.

    Computed in numpy on the (1, D, h, w) view that pytorch-grad-cam sees in the reference, so the
    reductions run in the same order.
    """
    h, w = grid
    act = activation.float().reshape(1, h, w, -1).permute(0, 3, 1, 2).cpu().numpy()
    g = grad.float().reshape(1, h, w, -1).permute(0, 3, 1, 2).cpu().numpy()
    weights = np.mean(g, axis=(2, 3))  # spatial mean of dp_k/dZ per channel
    cam = (weights[:, :, None, None] * act).sum(axis=1)
    return np.maximum(cam, 0).astype(np.float32)[0]


def softmax_gradcam_reference_order(
    visual: nn.Module,
    logit_scale: torch.Tensor,
    tokens: torch.Tensor,
    grid: tuple[int, int],
    fg_text: torch.Tensor,
    bg_text: torch.Tensor,
    labels: Sequence[Sequence[int]],
    softmax: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`softmax_gradcam` in the reference's arithmetic order: per image and per class, block L
    forward and one backward (as pytorch-grad-cam runs it), reductions in numpy. Same arguments and
    returns; for the parity check, not for speed."""
    block = visual.transformer.resblocks[-1]
    cams, attns = [], []
    for b, lab in enumerate(labels):
        # the image's own text set: [its present classes …, all background words]
        text = F.normalize(torch.cat([fg_text[list(lab)], bg_text], dim=0), dim=-1)
        for k in range(len(lab)):
            with torch.enable_grad():
                x = tokens[b : b + 1].detach()
                z = block.ln_1(x).detach().requires_grad_(True)
                out, attn = block_forward(block, x, need_attn=True, z=z)
                pooled = visual.ln_post(out)[:, 1:].mean(dim=1)
                feats = F.normalize(pooled @ visual.proj, dim=-1)
                logits = logit_scale.exp() * feats @ text.T
                score = (logits.softmax(dim=-1) if softmax else logits)[0, k]
                (grad,) = torch.autograd.grad(score, z)
            cams.append(torch.from_numpy(grad_cam_map(z[0, 1:].detach(), grad[0, 1:], grid)))
        attns.append(attn.detach()[0, 1:, 1:].float())
    cams = torch.stack(cams).to(tokens.device)
    return min_max_normalise(min_max_normalise(cams)), torch.stack(attns)
