"""Run an open_clip ViT on images of any size and read its attention (method §2).

These functions read the weights of an open_clip ``VisionTransformer`` and never write to it: the
positional embedding is resized on the fly, not stored on the module (the reference stores it).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn


def patch_size(visual: nn.Module) -> tuple[int, int]:
    """(ph, pw) of the ViT's patch embedding."""
    ks = visual.conv1.kernel_size
    return (ks, ks) if isinstance(ks, int) else (int(ks[0]), int(ks[1]))


def padded_size(height: int, width: int, patch: tuple[int, int], max_side: Optional[int] = None) -> tuple[int, int]:
    """The size an image is resized to before the ViT: (ceil(s·H/ph)·ph, ceil(s·W/pw)·pw).

    ``s = 1`` (method §2) unless the long side exceeds ``max_side``; then ``s = max_side / max(H, W)``,
    so a 5000×4000 photo costs what a ``max_side`` image costs (attention is quadratic in the patches).
    """
    scale = 1.0 if not max_side or max(height, width) <= max_side else max_side / max(height, width)
    out_h = max(1, -(-round(height * scale) // patch[0])) * patch[0]
    out_w = max(1, -(-round(width * scale) // patch[1])) * patch[1]
    return out_h, out_w


def preprocess(
    image: np.ndarray,
    patch: tuple[int, int],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    max_side: Optional[int] = None,
) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, H', W') float32 normalised, H' and W' multiples of the patch size.

    Bicubic on the PIL image, as the reference's torchvision ``Resize`` on a PIL input does
    (PIL's kernel and its rounding to uint8 both matter for parity). ``max_side`` caps the long
    side (see :func:`padded_size`); the maps are still returned at the image's own size.
    """
    height, width = image.shape[:2]
    out_h, out_w = padded_size(height, width, patch, max_side)
    resized = Image.fromarray(image).resize((out_w, out_h), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x - mean_t) / std_t


@dataclass(frozen=True)
class Preprocessor:
    """:func:`preprocess` as a picklable callable, so DataLoader workers resize and normalise."""

    patch: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    max_side: Optional[int] = None

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return preprocess(image, self.patch, self.mean, self.std, self.max_side)


def resized_pos_embed(visual: nn.Module, grid: tuple[int, int]) -> torch.Tensor:
    """Positional embedding for a ``grid = (h, w)`` patch grid: ``(1 + h*w, D)``.

    The CLS entry is kept; the square pretrained grid is resized with bilinear,
    align_corners=False, no antialias (method §2); the result is rounded to float16 precision.
    """
    pe = visual.positional_embedding
    n, dim = pe.shape[0] - 1, pe.shape[1]
    side = int(round(n**0.5))
    if side * side != n:
        raise ValueError(f"Positional embedding of {n} patch entries is not a square grid.")
    patches = pe[1:].T.reshape(1, dim, side, side)
    patches = F.interpolate(patches, size=grid, mode="bilinear", align_corners=False)
    resized = torch.cat([pe[:1], patches.reshape(dim, -1).T], dim=0)
    # The reference stores the resized table as float16 (``emb.half()``); rounding it the same way
    # keeps our maps within float32 noise of the reference's.
    return resized.half().to(pe.dtype)


def embed(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Patch + class + positional embedding and ``ln_pre``: (B, 3, H, W) -> (B, 1 + N, D)."""
    x = visual.conv1(images)
    grid = (x.shape[-2], x.shape[-1])
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + resized_pos_embed(visual, grid).to(x.dtype)
    return visual.ln_pre(x)


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device type
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def attention_with_weights(attn: nn.MultiheadAttention, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``attn(z, z, z, need_weights=True)`` written out for autocast: (B, T, D) -> output, head-averaged weights.

    The same formula as PyTorch's explicit path (softmax(q·kᵀ/√d)·v per head, then ``out_proj``), but
    the heads are averaged in float32 one head at a time: ``mean(dim=1)`` of bf16 weights first copied
    all of them to float32, 8 ms per block and VOC image on a 2-core CPU. Float32 runs keep PyTorch's
    own path, whose last bits the reference's numbers carry.
    """
    b, t, d = z.shape
    heads = attn.num_heads
    qkv = F.linear(z, attn.in_proj_weight, attn.in_proj_bias).view(b, t, 3, heads, d // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, T, d/H) each
    weights = torch.softmax((q * (d // heads) ** -0.5) @ k.transpose(-1, -2), dim=-1)  # (B, H, T, T)
    out = attn.out_proj((weights @ v).transpose(1, 2).reshape(b, t, d))
    with torch.no_grad():  # read by CAA only, never differentiated
        mean = weights[:, 0].to(torch.float32, copy=True)  # a copy even in float32: the sum must not alias weights
        for h in range(1, heads):
            mean.add_(weights[:, h])
        mean.div_(heads)
    return out, mean


def block_forward(
    block: nn.Module,
    x: torch.Tensor,
    need_attn: bool,
    z: Optional[torch.Tensor] = None,
    attn_mask: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One open_clip ``ResidualAttentionBlock`` that also returns head-averaged attention.

    Args:
        x: (B, T, D) block input (batch first).
        need_attn: return the (B, T, T) attention weights averaged over heads. Asking for them also
            selects PyTorch's explicit softmax path, whose last bits the reference's numbers carry
            (under autocast, :func:`attention_with_weights`, the same formula written out).
        z: ``ln_1(x)`` if the caller already holds it (GradCAM differentiates with respect to it).
        attn_mask: additive (T, T) mask (the text tower's causal mask).
    """
    z = block.ln_1(x) if z is None else z
    mask = attn_mask.to(z.dtype) if attn_mask is not None else None
    # The attention works sequence-first: hand it a (B, T, D) view of (T, B, D) memory, so that its
    # transpose is contiguous. A transposed input sends its projections through ``matmul``'s
    # broadcast path, which copies the (D, 3D) weight once per token where bf16 (oneDNN) needs
    # contiguous operands: 11x slower on an AVX-512 BF16 CPU. The layout is also the reference's.
    plain = block.attn.in_proj_weight is not None and block.attn.bias_k is None  # open_clip's ViTs
    if need_attn and mask is None and plain and _autocast_enabled(z.device.type):
        out, attn = attention_with_weights(block.attn, z)
    else:
        z_seq = z.transpose(0, 1).contiguous().transpose(0, 1)
        out, attn = block.attn(z_seq, z_seq, z_seq, need_weights=need_attn, average_attn_weights=True, attn_mask=mask)
    x = x + block.ls_1(out)
    x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return x, attn


def low_precision_copy(visual: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``visual`` whose matmul weights are stored in ``dtype``, to run under autocast.

    Autocast casts a float32 weight at every call and caches the cast only for weights that require
    grad (a frozen CLIP's do not): ViT-B/16's 86 M weights were cast again for every batch. Under
    autocast the copy computes exactly what ``visual`` computes (the same casts, made once). Biases
    stay float32: with a bias in ``dtype``, ``nn.MultiheadAttention`` would take its fused fast path
    (it compares the query's dtype with the bias's), whose arithmetic differs.
    """
    lowp = copy.deepcopy(visual)
    for module in lowp.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            module.weight.data = module.weight.data.to(dtype)
        elif isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            module.in_proj_weight.data = module.in_proj_weight.data.to(dtype)
    return lowp


def run_frozen_blocks(
    visual: nn.Module, images: torch.Tensor, attn_from: int
) -> tuple[torch.Tensor, list[torch.Tensor], tuple[int, int]]:
    """Blocks 1 … L-1 without gradients (block L is left for GradCAM).

    Args:
        images: (B, 3, H, W) preprocessed, H and W multiples of the patch size.
        attn_from: 0-based index of the first block whose attention is kept (for CAA); the blocks
            before it take PyTorch's fused attention path, since their weights are not needed.
    Returns:
        tokens (B, 1 + N, D) after block L-1; the head-averaged patch-to-patch attention
        (B, N, N) float32 of blocks ``attn_from … L-2``, one tensor per block; the grid (h, w).
    """
    blocks = visual.transformer.resblocks
    ph, pw = patch_size(visual)
    grid = (images.shape[-2] // ph, images.shape[-1] // pw)
    attns = []
    with torch.no_grad():
        x = embed(visual, images)
        for i, block in enumerate(blocks[:-1]):
            x, attn = block_forward(block, x, need_attn=i >= attn_from)
            if attn is not None:
                attns.append(attn[:, 1:, 1:].float())
    return x, attns, grid
