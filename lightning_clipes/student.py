"""``SegmentationStudent``: the segmentation network trained on CLIP-ES pseudo-masks (method §5-6).

``fit`` minimises the confidence-guided loss with an iteration-based poly schedule (backbone and head in
separate parameter groups) and validates at full resolution (``val/mIoU``, the checkpoint monitor);
``test`` scores ``test/mIoU`` where there is ground truth, and ``test``/``predict`` write VOC-palette PNGs
to ``<output_dir>/predictions/<id>.png`` for the VOC evaluation server. Evaluation as WSSS papers report
it: multi-scale + flip (``val_scales``, ``val_flip``) and, optionally, a dense CRF on the student's
softmax (``test_crf``). The network, its normalisation and warm start live in
:mod:`lightning_clipes.components.student_factory`, the parameter groups in
:mod:`lightning_clipes.components.param_groups`, the loss in :mod:`lightning_clipes.components.losses`.

Batches (from the segmentation DataModules):

* train: ``{"image": (B, 3, h, w) float32 in [0, 1], "mask": (B, h, w) int64, 255 = ignored}``;
  other keys (``confidence``, ``id``) are ignored.
* val / test / predict: ``{"id": [str], "image": (1, 3, H, W) float32 in [0, 1],
  "mask": (1, H, W) int64 ground truth, 255 = void (all 255 when there is none)}``.
"""
from __future__ import annotations

import dataclasses
import io
import math
import warnings
from functools import partial
from pathlib import Path
from typing import Optional

import lightning as L
import numpy as np
import torch
from PIL import Image
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics.classification import MulticlassConfusionMatrix

from lightning_clipes.components.crf import STUDENT_CRF, CRFParams, dense_crf, require_crf
from lightning_clipes.components.losses import confidence_guided_loss, multi_scale_inputs_loss
from lightning_clipes.components.param_groups import apply_lr_multipliers, check_group_settings, parameter_groups
from lightning_clipes.components.student_factory import (
    SHIPPED_ENCODER, PaddedSegmenter, create_student, encoder_normalisation, load_network_weights, shipped_encoder,
)
from lightning_clipes.data.store import atomic_write_bytes
from lightning_clipes.data.voc_format import save_mask_png
from lightning_clipes.metrics import iou_from_confmat, segmentation_confmat
from lightning_clipes.visualize import image_panel, pad_to_common_size

IGNORE_INDEX = 255

def poly_factor(step: int, total_steps: int, power: float) -> float:
    """Poly learning-rate multiplier ``(1 - step / total_steps) ** power``, 0 from ``total_steps`` on."""
    return (1.0 - min(step, total_steps) / total_steps) ** power


class SegmentationStudent(L.LightningModule):
    """A DeepLab-style student trained with the confidence-guided loss on pseudo-masks.

    Args:
        num_classes: classes with background (21 for VOC); must match the data's masks.
        arch, encoder_name, encoder_weights: the network, see
            :func:`~lightning_clipes.components.student_factory.create_student` (``encoder_weights: null``
            = random init, nothing downloaded). ``arch_kwargs``: further keyword arguments of the smp
            architecture, e.g. ``{decoder_channels: [64, 32, 32, 16, 16]}`` (a slimmer U-Net decoder).
        optimizer: built over the parameter groups (see ``head_lr_mult``); in YAML
            ``{class_path: torch.optim.AdamW, init_args: {lr: 1e-4}}``, whose ``lr`` is the backbone's (base)
            LR. Default SGD lr 0.01, momentum 0.9, weight decay 5e-4 (the paper: SGD momentum 0.9, wd 5e-4).
            jsonargparse keeps the default's init_args that the new class also takes (here
            ``weight_decay``) unless the YAML sets them, so give ``weight_decay`` when you switch.
        poly_power: LR = base · (1 - step / max_steps) ** poly_power for every group, stepped every optimizer step.
        msc_scales: further input scales of deeplab-pytorch's multi-scale-input training (``[0.5, 0.75]``
            in the paper's DeepLabV2_ResNet101_MSC): the loss is the sum of the confidence-guided loss of
            the crop's logits, of each scale's and of their pixel-wise max
            (:func:`~lightning_clipes.components.losses.multi_scale_inputs_loss`); about 1.8x the compute
            of one scale with ``[0.5, 0.75]``. ``[]`` (default): the crop alone.
        val_scales, val_flip: test-time augmentation of val/test/predict (softmax averaged over the
            scales and the horizontal flip); ``[1.0]`` and ``false`` = one plain forward.
        class_names: one name per class, background first, for ``val/IoU/<name>``; default: the
            DataModule's foreground names after ``background`` when their count fits, else indices.
        num_panels: image | ground truth | prediction pictures per validation (rank 0), logged to W&B or
            TensorBoard, else written to ``<default_root_dir>/val_panels/step<N>/<id>.jpg``; with the
            pseudo-label before the prediction for the images the datamodule labelled for pictures
            (``SegmentationDataModule.panel_pseudo_labels``).
        output_dir: where ``predictions/<id>.png`` go; default ``trainer.default_root_dir``.
        head_lr_mult: LR of the head (everything outside the network's ``encoder``) / the optimizer's LR;
            DeepLab uses 10. Default 1 (one LR for all).
        head_bias_lr_mult, head_bias_weight_decay: a third group for the head's biases (DeepLab v2: 20x
            LR, weight decay 0); ``null`` = biases stay in the head group. See
            :mod:`lightning_clipes.components.param_groups`.
        sync_batchnorm: under DDP (world size > 1), turn the network's BatchNorm layers into SyncBatchNorm
            before training, so that statistics are computed over the global batch. The same as
            ``trainer.sync_batchnorm``, but a model setting, so that a config that includes its trainer
            block from a file (``trainer: trainer_default.yaml``) can still ask for it.
        test_crf: after the test-time augmentation, a dense CRF (``crf_params``) on each image's softmax and
            the real RGB image, in ``validate``, ``test`` and ``predict`` runs (not in the validations
            during ``fit``: about 1 s per VOC image on one CPU core). Needs pydensecrf2; checked here.
        crf_params: that CRF's iterations and kernels; default :data:`STUDENT_CRF` (deeplab-pytorch's).
        init_checkpoint: start from the network weights of a checkpoint (a SegmentationStudent ``.ckpt``
            or a state dict of the same architecture), e.g. a student trained on COCO; loaded here, not
            saved in the hyper-parameters (the weights are in every checkpoint of this run). ``shipped``: the
            toy-world encoder the package ships for ``encoder_name`` (with ``init_exclude: [decoder,
            segmentation_head]``; see :mod:`lightning_clipes.toy_encoder`), the toy student's stand-in for
            the paper's ImageNet initialisation.
        init_exclude: modules of the network that keep their fresh initialisation instead (e.g. ``[aspp]``
            for DeepLabV2 or ``[segmentation_head]`` for smp models when the checkpoint has another
            number of classes). Any other difference is an error that names the keys.
        channels_last: weights and inputs in NHWC memory layout (faster convolutions with ``bf16-mixed`` on
            GPUs with tensor cores; measured in ``benchmarks/student_throughput.py``).
    """

    def __init__(
        self,
        num_classes: int = 21,
        arch: str = "DeepLabV3Plus",
        encoder_name: str = "resnet101",
        encoder_weights: Optional[str] = "imagenet",
        optimizer: OptimizerCallable = lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, weight_decay=5e-4),
        poly_power: float = 0.9,
        msc_scales: list[float] = [],  # noqa: B006 (jsonargparse needs the literal list as the default)
        val_scales: list[float] = [1.0],  # noqa: B006 (jsonargparse needs the literal list as the default)
        val_flip: bool = False,
        class_names: Optional[list[str]] = None,
        num_panels: int = 4,
        output_dir: Optional[str] = None,
        head_lr_mult: float = 1.0,
        head_bias_lr_mult: Optional[float] = None,
        head_bias_weight_decay: Optional[float] = None,
        sync_batchnorm: bool = False,
        test_crf: bool = False,
        crf_params: CRFParams = STUDENT_CRF,
        init_checkpoint: Optional[str] = None,
        init_exclude: list[str] = [],  # noqa: B006 (as val_scales)
        channels_last: bool = False,
        arch_kwargs: Optional[dict] = None,
    ) -> None:
        super().__init__()
        # The optimizer callable is not picklable (a lambda); the CLI's config.yaml records it instead.
        # init_checkpoint is left out so that load_from_checkpoint does not need that file any more.
        # The settings are read from attributes, not self.hparams: under LightningCLI every LightningModule
        # built from the config receives the *model's* hparams, so self.hparams is for logs/checkpoints only.
        # crf_params goes in as a plain dict: checkpoints then load with torch.load(weights_only=True).
        if isinstance(crf_params, dict):  # from such a checkpoint's hyper-parameters
            crf_params = CRFParams(**crf_params)
        self.save_hyperparameters(ignore=["optimizer", "init_checkpoint", "crf_params"])
        self.hparams["crf_params"] = dataclasses.asdict(crf_params)
        if poly_power < 0:
            raise ValueError(f"poly_power must be >= 0, got {poly_power}.")
        if any(s <= 0 for s in msc_scales):
            raise ValueError(f"msc_scales must be positive factors (or [] for one scale), got {msc_scales}.")
        if not val_scales or any(s <= 0 for s in val_scales):
            raise ValueError(f"val_scales must be a non-empty list of positive factors, got {val_scales}.")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(
                f"class_names lists {len(class_names)} names but num_classes is {num_classes}; give one name "
                "per class, background first, or leave class_names null."
            )
        if test_crf:
            require_crf()  # fail at start, naming the install command, not after the first validation
        check_group_settings(head_lr_mult, head_bias_lr_mult, head_bias_weight_decay)
        net = create_student(arch, encoder_name, encoder_weights, num_classes, arch_kwargs)
        if init_checkpoint == SHIPPED_ENCODER:
            init_checkpoint = shipped_encoder(encoder_name)
        if init_checkpoint is not None:
            load_network_weights(net, init_checkpoint, init_exclude)
        elif init_exclude:
            raise ValueError(f"init_exclude {init_exclude} is set without init_checkpoint; set both or neither.")
        self.model = PaddedSegmenter(net, *encoder_normalisation(encoder_name, encoder_weights))
        if channels_last:
            self.model.use_channels_last()
        self.optimizer_factory = optimizer
        self.head_lr_mult, self.head_bias_lr_mult = head_lr_mult, head_bias_lr_mult
        self.head_bias_weight_decay, self.sync_batchnorm = head_bias_weight_decay, sync_batchnorm
        self.test_crf, self.crf_params = test_crf, crf_params
        self.num_classes, self.poly_power, self.msc_scales = num_classes, poly_power, list(msc_scales)
        self.val_scales, self.val_flip = list(val_scales), val_flip
        self.class_names = list(class_names) if class_names is not None else None
        self.num_panels, self.output_dir = num_panels, output_dir
        self.val_confmat = segmentation_confmat(num_classes, IGNORE_INDEX)
        self.test_confmat = segmentation_confmat(num_classes, IGNORE_INDEX)
        self._panels: list[tuple[str, np.ndarray]] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float32 in [0, 1], any H, W -> (B, num_classes, H, W) float32 logits."""
        return self.model(images)

    # ------------------------------------------------------------------- train
    @staticmethod
    def _unpack(batch: dict, stage: str, need_mask: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if not isinstance(batch, dict) or "image" not in batch or (need_mask and "mask" not in batch):
            got = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
            raise ValueError(
                f"A {stage} batch must be a dict with 'image' (B, 3, H, W) float in [0, 1] and 'mask' (B, H, W) "
                f"int64 (255 = ignored); got {got}. Use one of the lightning_clipes segmentation DataModules."
            )
        images, mask = batch["image"], batch.get("mask")
        if mask is not None and (mask.ndim != 3 or mask.shape[0] != images.shape[0] or mask.shape[-2:] != images.shape[-2:]):
            raise ValueError(
                f"{stage} mask {tuple(mask.shape)} does not match image {tuple(images.shape)}; expected (B, H, W)."
            )
        return images, mask

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        images, mask = self._unpack(batch, "train")
        if self.msc_scales:
            loss = multi_scale_inputs_loss(self.model, images, mask, self.msc_scales, IGNORE_INDEX)
        else:
            loss = confidence_guided_loss(self.model(images), mask, IGNORE_INDEX)
        n = images.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/ignored_fraction", (mask == IGNORE_INDEX).float().mean(), batch_size=n)
        return loss

    def _total_steps(self) -> int:
        max_steps = self.trainer.max_steps
        if max_steps is None or max_steps < 0:
            estimated = self.trainer.estimated_stepping_batches
            if not math.isfinite(estimated):
                raise ValueError(
                    "The poly LR schedule needs a finite number of steps: set --trainer.max_steps N (the paper "
                    "trains 20000 iterations) or a finite --trainer.max_epochs."
                )
            max_steps = int(estimated)
        return max(1, int(max_steps))

    def setup(self, stage: str) -> None:
        if self.sync_batchnorm and stage == "fit" and self.trainer.world_size > 1:
            # before the strategy wraps the model in DDP (Lightning calls setup first); the parameters are
            # the same objects, so frozen ones stay frozen and checkpoints keep BatchNorm's key names
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)

    def configure_optimizers(self) -> dict:
        groups = parameter_groups(self.model.net, self.head_lr_mult, self.head_bias_lr_mult, self.head_bias_weight_decay)
        optimizer = self.optimizer_factory(groups)
        apply_lr_multipliers(optimizer)  # the optimizer's lr is the base; before LambdaLR records base_lrs
        schedule = partial(poly_factor, total_steps=self._total_steps(), power=self.poly_power)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": LambdaLR(optimizer, schedule), "interval": "step", "frequency": 1},
        }

    # --------------------------------------------------------------- inference
    def _crf_now(self) -> bool:
        """``test_crf`` applies to validate/test/predict runs, not to the validations inside ``fit``."""
        trainer = self._trainer
        return self.test_crf and (trainer is None or trainer.state.fn != TrainerFn.FITTING)

    def _predict(
        self, batch: dict, stage: str, confmat: Optional[MulticlassConfusionMatrix] = None
    ) -> list[tuple[str, torch.Tensor]]:
        """Full-resolution labels (H, W) int64 per image, with ``val_scales``/``val_flip`` and the CRF when
        asked; updates ``confmat``."""
        images, gt = self._unpack(batch, stage, need_mask=confmat is not None)
        ids = list(batch.get("id") or [f"{stage}_{i}" for i in range(images.shape[0])])
        use_crf = self._crf_now()
        out = []
        for i in range(images.shape[0]):
            probs = self.model.predict_probabilities(images[i : i + 1], self.val_scales, self.val_flip)
            if use_crf:
                rgb = (images[i].float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
                q = dense_crf(rgb, probs[0].cpu().numpy(), self.crf_params)
                pred = torch.from_numpy(q.argmax(0)).to(probs.device)
            else:
                pred = probs.argmax(1)[0]
            if confmat is not None:
                confmat.update(pred.flatten(), gt[i].flatten().long())
            out.append((str(ids[i]), pred))
        return out

    def _class_names(self) -> list[str]:
        if self.class_names is not None:
            return list(self.class_names)
        data_names = getattr(getattr(self._trainer, "datamodule", None), "class_names", None)
        if data_names is not None and len(data_names) + 1 == self.num_classes:
            return ["background", *data_names]
        return [str(i) for i in range(self.num_classes)]

    def _log_iou(self, stage: str, confmat: MulticlassConfusionMatrix) -> None:
        """Log ``<stage>/mIoU`` and ``<stage>/IoU/<class>`` (classes in ground truth or prediction)."""
        matrix = confmat.compute()  # summed over DDP ranks by torchmetrics
        confmat.reset()
        if matrix.sum() == 0:
            if stage == "val" and not self.trainer.sanity_checking:
                warnings.warn(
                    "No validation image had ground truth, so val/mIoU was not logged (a checkpoint monitoring "
                    "it will fail); validate on a split with ground-truth masks.", stacklevel=2)
            return
        per_class, miou = iou_from_confmat(matrix)
        # torchmetrics already summed the matrix over the ranks: every rank holds the same value, and
        # sync_dist averages identical values (without it Lightning warns on every rank at every validation)
        self.log(f"{stage}/mIoU", float(miou), prog_bar=stage == "val", sync_dist=True)
        for name, iou in zip(self._class_names(), per_class):
            if not torch.isnan(iou):
                self.log(f"{stage}/IoU/{name}", float(iou), sync_dist=True)

    def _write_predictions(self, preds: list[tuple[str, torch.Tensor]]) -> list[str]:
        root = Path(self.output_dir or self.trainer.default_root_dir) / "predictions"
        for image_id, pred in preds:
            buf = io.BytesIO()
            save_mask_png(buf, pred.to(torch.uint8).cpu().numpy())
            atomic_write_bytes(root / f"{image_id}.png", buf.getvalue())
        return [image_id for image_id, _ in preds]

    # -------------------------------------------------------------- validation
    def _image_loggers(self) -> list:
        return [lg for lg in self.loggers if isinstance(lg, (WandbLogger, TensorBoardLogger))]

    def on_validation_epoch_start(self) -> None:
        self.val_confmat.reset()
        self._panels = []

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        preds = self._predict(batch, "val", self.val_confmat)
        want = self.num_panels - len(self._panels)
        if want <= 0 or self.global_rank != 0 or self.trainer.sanity_checking:
            return
        pseudo = getattr(self.trainer.datamodule, "panel_labels", None) or {}  # SegmentationDataModule's, when it has them
        for i, (image_id, pred) in enumerate(preds[:want]):
            image = (batch["image"][i].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
            gt = batch["mask"][i].clamp(0, 255).to(torch.uint8).cpu().numpy()
            picture = image_panel(image, gt, pred.to(torch.uint8).cpu().numpy(), pseudo.get(image_id))
            self._panels.append((image_id, picture))

    def on_validation_epoch_end(self) -> None:
        self._log_iou("val", self.val_confmat)
        if self._panels and not self._image_loggers():  # no logger takes pictures: keep them on disk
            folder = Path(self.trainer.default_root_dir) / "val_panels" / f"step{self.global_step:07d}"
            for image_id, picture in self._panels:
                buf = io.BytesIO()
                Image.fromarray(picture).save(buf, format="JPEG", quality=90)
                atomic_write_bytes(folder / f"{image_id}.jpg", buf.getvalue())
        if self._panels:
            ids, pictures = zip(*self._panels)
            for logger in self._image_loggers():
                if isinstance(logger, WandbLogger):
                    logger.log_image(key="val/panels", images=pad_to_common_size(list(pictures)), caption=list(ids),
                                     step=self.global_step)
                else:
                    for image_id, picture in self._panels:
                        logger.experiment.add_image(f"val/panels/{image_id}", picture, self.global_step, dataformats="HWC")
        self._panels = []

    # ------------------------------------------------------------ test/predict
    def on_test_epoch_start(self) -> None:
        self.test_confmat.reset()

    def test_step(self, batch: dict, batch_idx: int) -> None:
        has_gt = isinstance(batch, dict) and batch.get("mask") is not None
        self._write_predictions(self._predict(batch, "test", self.test_confmat if has_gt else None))

    def on_test_epoch_end(self) -> None:
        self._log_iou("test", self.test_confmat)

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> list[str]:
        """Write the batch's predictions as palette PNGs; returns their image ids."""
        return self._write_predictions(self._predict(batch, "predict"))
