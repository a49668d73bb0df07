"""Pretrain the toy student's encoder in the toy world (``clipes fit -c experiments/toy_encoder.yaml``).

The paper's student starts from an ImageNet-trained backbone (method §6: DeepLabV2-ResNet101, ImageNet
init). ImageNet cannot reach these machines and its classes are not the toy world's, so ``ToyEncoder``
is the toy world's stand-in: the student's smp encoder learns to name the classes an image shows
(multi-label classification, binary cross-entropy, over the mean of its last feature map), from the same
stream of scenes that trains the toy CLIP (:class:`~lightning_clipes.data.toy_captions.ToyCaptionDataModule`,
indices no dataset split uses; the image-level labels are the weak supervision the method has anyway).
At the end of ``fit`` the encoder's weights are exported as float16 under the keys the student's network
gives them (``encoder.…``), the file that ``SegmentationStudent(init_checkpoint=…, init_exclude=[decoder,
segmentation_head])`` loads; ``init_checkpoint: shipped`` picks the package's own
(``lightning_clipes/weights/encoders/<encoder_name>.pt``).
"""
from __future__ import annotations

import math
from typing import Optional

import lightning as L
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch.optim.lr_scheduler import LambdaLR

from lightning_clipes.components.provenance import write_weights
from lightning_clipes.components.student_factory import create_student, encoder_normalisation
from lightning_clipes.data.toy_scenes import TOY_CLASSES

class ToyEncoder(L.LightningModule):
    """A student's encoder trained to name the toy world's classes; exports its weights at the end of ``fit``.

    Args:
        arch, encoder_name: the student network whose encoder is trained (built with random weights, as
            :func:`~lightning_clipes.components.student_factory.create_student` builds it; only its
            ``encoder`` is used and exported, so any smp architecture with that encoder can load the file).
        image_size: side the stream's images are resized to (the student's crop side: 96 in the toy world).
        lr, weight_decay, warmup_steps: AdamW with linear warm-up, then cosine decay to 0 at
            ``trainer.max_steps``.
        export_path: where the encoder's float16 weights go when ``fit`` ends (``null``: not exported;
            never under ``fast_dev_run``).
    """

    def __init__(self, arch: str = "Unet", encoder_name: str = "tu-regnetx_002", image_size: int = 96,
                 lr: float = 1e-3, weight_decay: float = 1e-4, warmup_steps: int = 50,
                 export_path: Optional[str] = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.image_size, self.export_path = image_size, export_path
        self.lr, self.weight_decay, self.warmup_steps = lr, weight_decay, warmup_steps
        self.encoder = create_student(arch, encoder_name, None, 1).encoder
        self.head = torch.nn.Linear(self.encoder.out_channels[-1], len(TOY_CLASSES))
        mean, std = encoder_normalisation(encoder_name, None)  # what the student's PaddedSegmenter applies
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        # the caption stream normalises for CLIP; undone here, then normalised as the student does
        self.register_buffer("clip_mean", torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("clip_std", torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1), persistent=False)

    def prepare(self, images: torch.Tensor, flip: bool) -> torch.Tensor:
        """CLIP-normalised stream images -> the student's input statistics at ``image_size``, flipped at random."""
        x = images * self.clip_std + self.clip_mean
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False, antialias=True)
        if flip:
            mirror = torch.rand(x.shape[0], device=x.device) < 0.5
            x = torch.where(mirror.view(-1, 1, 1, 1), x.flip(-1), x)
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) student-normalised images -> (B, classes) logits."""
        return self.head(self.encoder(x)[-1].mean((2, 3)))

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, _, present = batch
        loss = F.binary_cross_entropy_with_logits(self(self.prepare(images, flip=True)), present.float())
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        images, _, present = batch
        logits = self(self.prepare(images, flip=False))
        guess = logits > 0
        n = len(images)
        self.log("val/loss", F.binary_cross_entropy_with_logits(logits, present.float()), batch_size=n)
        self.log("val/exact_match", (guess == present).all(1).float().mean(), batch_size=n, prog_bar=True)
        hits = (guess & present).sum().float()
        self.log("val/precision", hits / guess.sum().clamp(min=1), batch_size=n)
        self.log("val/recall", hits / present.sum().clamp(min=1), batch_size=n)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        total = max(1, int(self.trainer.max_steps) if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches)

        def factor(step: int) -> float:
            return min(1.0, (step + 1) / max(1, self.warmup_steps)) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total)))

        return {"optimizer": opt, "lr_scheduler": {"scheduler": LambdaLR(opt, factor), "interval": "step"}}

    def export(self, path: str) -> str:
        """Write the encoder's weights (float16, keys ``encoder.…``, under ``"state_dict"``) where
        ``init_checkpoint`` can load them, with the software and processor they were trained on
        (``"trained_with"``); returns a line saying where, and whether the tensors equal those of the
        file replaced (:func:`~lightning_clipes.components.provenance.write_weights`)."""
        state = {f"encoder.{k}": (v.half() if v.is_floating_point() else v).clone()
                 for k, v in self.encoder.state_dict().items()}
        return write_weights(path, {"state_dict": state}, self.device)

    def on_fit_end(self) -> None:
        if self.export_path and not self.trainer.fast_dev_run and self.trainer.is_global_zero:
            print(f"ToyEncoder: {self.export(self.export_path)}")
