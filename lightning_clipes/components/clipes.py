"""CLIP-ES as a plain ``nn.Module``: images + image-level labels -> class maps (method §1-§4)."""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lightning_clipes.components.affinity import refine_cams, refine_cams_batched, sinkhorn_affinity
from lightning_clipes.components.clip_loader import LoadedCLIP
from lightning_clipes.components.gradcam import softmax_gradcam, softmax_gradcam_reference_order
from lightning_clipes.components.prompts import encode_prompts
from lightning_clipes.components.vit_tokens import Preprocessor, low_precision_copy, patch_size, run_frozen_blocks


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


PRECISIONS = ("32", "bf16", "16")
# Images per ViT call on a CPU. More same-size images in one call run slower there, their attention
# maps (12 x 769 x 769 floats per image and block at VOC size) outgrowing the caches. ViT-B/16, 375x500
# images, 2 cores (benchmarks/labeler_throughput.py, median of 3 rounds): float32 0.93 / 0.86 / 0.64
# images/s at 1 / 2 / 6 images a call, bf16 2.18 / 2.13 / 1.99 at 1 / 2 / 4. GPUs take every same-size
# image of the batch at once.
CPU_BATCH = 1


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``16`` on CUDA (the reference runs CLIP in float16 on a GPU), else ``32``.

    Not bf16 on CPUs, although on our CI's AVX-512 BF16 CPU it labels about twice as many images a
    second (benchmarks/labelling_pass.py, steady state: 2.14 against 1.00 images/s) with the same
    toy-world mIoU to 0.1 (benchmarks/toy_world_quality.py --precision bf16): float32 is what the
    reference runs on a CPU (parity), bf16 still changes about 3 % of the pixels' labels with random
    weights, and CPUs without bf16 units emulate it slowly. Ask for ``bf16`` to get the speed."""
    if precision != "auto":
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of auto, {', '.join(PRECISIONS)}; got {precision!r}.")
        return precision
    return "16" if device.type == "cuda" else "32"


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
        softmax: GradCAM of the softmax probability (CLIP-ES); ``False`` = of the raw logit (plain
            GradCAM, the paper's ablation).
        logit_scale: the scale of the cosine similarities in that softmax; ``None`` = the CLIP's own
            (method §3). A CLIP whose learned scale saturates the softmax can be run cooler.
        max_side: cap on the long side of the ViT's input (maps still come back at full size); ``None``
            = no cap, the reference's behaviour.
        precision: ``32``, ``bf16``, ``16`` (autocast of the ViT; GradCAM reductions and CAA stay in
            float32) or ``auto`` (see :func:`resolve_precision`, decided on the device of each call).
        reference_order: run GradCAM and CAA in the reference's arithmetic order (block L image by
            image, numpy reductions, one class at a time) and the text tower over all 77 tokens;
            slower, for the parity check.
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
        softmax: bool = True,
        logit_scale: Optional[float] = None,
        max_side: Optional[int] = None,
        precision: str = "32",
        reference_order: bool = False,
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
        if max_side is not None and max_side < max(self.patch):
            raise ValueError(f"max_side must be at least the patch size {max(self.patch)}, got {max_side}.")
        if precision != "auto" and precision not in PRECISIONS:
            raise ValueError(f"precision must be one of auto, {', '.join(PRECISIONS)}; got {precision!r}.")
        self.affinity_layers = affinity_layers
        self._lowp_visual: Optional[tuple[tuple, nn.Module]] = None  # (key, copy); a tuple, so not a submodule
        self.softmax, self.max_side = softmax, max_side
        if logit_scale is not None and not logit_scale > 0:
            raise ValueError(f"logit_scale must be null (the CLIP's own) or positive, got {logit_scale}.")
        # stored as its log, as CLIP's; a buffer, so it follows the module to its device (None: the CLIP's own)
        log_scale = None if logit_scale is None else torch.tensor(math.log(logit_scale))
        self.register_buffer("softmax_log_scale", log_scale, persistent=False)
        self.precision, self.reference_order = precision, reference_order
        # reference_order encodes as the reference does: one call per name, over the padding too (last bits)
        for key, names in (("fg_text", self.class_names), ("bg_text", list(background))):
            text = encode_prompts(self.clip, clip.tokenizer, names, templates, full_context=reference_order)
            self.register_buffer(key, text, persistent=False)

    @property
    def patch(self) -> tuple[int, int]:
        return patch_size(self.clip.visual)

    def train(self, mode: bool = True) -> "CLIPES":
        """CLIP stays frozen in eval mode whatever the surrounding module does."""
        super().train(mode)
        self.clip.eval()
        return self

    @property
    def preprocessor(self) -> Preprocessor:
        """The picklable image transform of this labeller (for DataLoader workers)."""
        return Preprocessor(self.patch, tuple(self.mean), tuple(self.std), self.max_side)

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 RGB -> (3, H', W') float32, H' and W' multiples of the patch size."""
        return self.preprocessor(image)

    def _visual(self, dtype: Optional[torch.dtype]) -> nn.Module:
        """The ViT to run: CLIP's own in float32, else a copy with its matmul weights in ``dtype`` (see
        :func:`~lightning_clipes.components.vit_tokens.low_precision_copy`: bf16 on a CPU about 10 % faster),
        made again when CLIP's weights move or change."""
        visual = self.clip.visual
        if dtype is None:
            return visual
        params = list(visual.parameters())
        key = (dtype, params[0].device, params[0].data_ptr(), sum(p._version for p in params))
        if self._lowp_visual is None or self._lowp_visual[0] != key:
            self._lowp_visual = None  # free the old copy first
            self._lowp_visual = (key, low_precision_copy(visual, dtype))
        return self._lowp_visual[1]

    def forward(
        self, images: Sequence[torch.Tensor], labels: Sequence[Sequence[int]], sizes: Sequence[tuple[int, int]]
    ) -> list[ClassMaps]:
        """Class maps for a batch.

        Args:
            images: per image (3, H', W') from :meth:`preprocess`; images of the same size run together.
            labels: per image, the present class indices (0-based, order kept, at least one each).
            sizes: per image, the original (H, W) the maps are resized to.
        Returns:
            per image, :class:`ClassMaps` on this module's device.
        """
        for i, lab in enumerate(labels):
            if len(lab) == 0:
                raise ValueError(f"Image {i} of the batch has no labels; filter such images before CLIPES.")
            if len(set(lab)) != len(lab) or min(lab) < 0 or max(lab) >= len(self.class_names):
                raise ValueError(f"Image {i} has labels {list(lab)}: expected distinct indices in 0…{len(self.class_names) - 1}.")
        device = self.fg_text.device
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, img in enumerate(images):
            groups[tuple(img.shape)].append(i)
        step = CPU_BATCH if device.type == "cpu" else len(images)
        chunks = [idx[k : k + step] for idx in groups.values() for k in range(0, len(idx), step)]
        out: list[ClassMaps] = [None] * len(images)  # type: ignore[list-item]
        precision = resolve_precision(self.precision, device)
        dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(precision)
        # Lightning predicts under inference mode; the GradCAM backward needs ordinary tensors.
        with torch.inference_mode(False), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            visual = self._visual(dtype)  # made outside inference mode: the backward reads its weights
            for idx in chunks:
                batch = torch.stack([images[i] for i in idx]).to(device, torch.float32, non_blocking=True)
                maps = self._forward_same_size(visual, batch.clone(), [labels[i] for i in idx], [sizes[i] for i in idx])
                for i, m in zip(idx, maps):
                    out[i] = m
        return out

    def _forward_same_size(self, visual, images, labels, sizes) -> list[ClassMaps]:
        depth = len(visual.transformer.resblocks)
        tokens, attns, grid = run_frozen_blocks(visual, images, attn_from=depth - self.affinity_layers)
        gradcam = softmax_gradcam_reference_order if self.reference_order else softmax_gradcam
        log_scale = self.clip.logit_scale if self.softmax_log_scale is None else self.softmax_log_scale
        cams, attn_last = gradcam(visual, log_scale, tokens, grid, self.fg_text, self.bg_text, labels,
                                  softmax=self.softmax)
        with torch.autocast(images.device.type, enabled=False):  # CAA in float32
            attn = torch.stack([*attns, attn_last]).float().mean(dim=0)  # (B, N, N), mean over the last blocks
            affinity = sinkhorn_affinity(attn, self.sinkhorn_rounds)
            if self.reference_order:
                refined, row = [], 0
                for b, lab in enumerate(labels):
                    refined.append(refine_cams(cams[row : row + len(lab)], affinity[b], self.box_threshold))
                    row += len(lab)
                refined = torch.cat(refined)
            else:
                owner = torch.repeat_interleave(torch.arange(len(labels)), torch.tensor([len(lab) for lab in labels]))
                refined = refine_cams_batched(cams, affinity, owner.to(cams.device), self.box_threshold)
            results, row = [], 0
            for b, lab in enumerate(labels):
                k = len(lab)
                both = torch.cat([refined[row : row + k], cams[row : row + k]])[None]
                both = F.interpolate(both, size=tuple(sizes[b]), mode="bilinear", align_corners=False)[0]
                row += k
                results.append(ClassMaps(keys=torch.tensor(list(lab), dtype=torch.int64), cams=both[:k], cams_raw=both[k:]))
        return results
