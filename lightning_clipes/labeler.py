"""``CLIPESLabeler``: the frozen CLIP-ES labeler as a LightningModule.

``predict`` writes pseudo-labels to a :class:`~lightning_clipes.data.store.PseudoLabelStore`
(resumable), ``validate`` scores them against ground truth as ``pseudo/mIoU``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import lightning as L
import torch

from lightning_clipes.components.clip_loader import load_clip
from lightning_clipes.components.crf import CRFParams, require_crf
from lightning_clipes.components.clipes import CLIPES, ClassMaps
from lightning_clipes.components.prompts import CLIPES_TEMPLATE, check_templates, create_background, create_vocabulary
from lightning_clipes.components.pseudo_mask import cams_to_label, mask_and_confidence
from lightning_clipes.data.store import PseudoLabelStore, atomic_write_bytes
from lightning_clipes.metrics import iou_from_confmat, segmentation_confmat
from lightning_clipes.visualize import label_panel


class CLIPESLabeler(L.LightningModule):
    """Image + image-level labels -> refined class maps and pseudo-masks, with a frozen CLIP.

    Args:
        model_name: open_clip ViT name (architecture of tags and open_clip checkpoints).
        pretrained: open_clip pretrained tag (``openai``), path to OpenAI's ``ViT-B-16.pt`` (TorchScript
            or state dict) or to an open_clip checkpoint; ``null`` = random weights (meaningless masks).
        quick_gelu: ``null`` = automatic (QuickGELU for OpenAI-format files); see ``load_clip``.
        class_names: ``voc``, ``coco`` or a list of prompt names in the dataset's class order.
        background: ``voc``, ``coco``, ``none`` or a list of background words.
        templates: prompt templates; several are averaged.
        box_threshold: CAA box threshold (0.4 VOC, 0.7 COCO).
        affinity_layers: last blocks whose attention forms the affinity.
        bg_power: background exponent t in ``(1 - max cam)^t``.
        output_dir: pseudo-label store; default ``<trainer.default_root_dir>/pseudo_labels``.
        save_cams: keep the float16 cams (``cams/<id>.npz``) beside the masks.
        preview_images: write ``preview/<id>.jpg`` (image | strongest cam | mask) for this many
            images per process, to look at the labels without opening arrays.
        crf: refine training masks with the dense CRF (the paper's +dCRF; needs
            ``pip install "lightning_clipes[crf]"``); ``crf_params`` holds its settings.
    """

    def __init__(
        self,
        model_name: str = "ViT-B-16",
        pretrained: Optional[str] = "openai",
        quick_gelu: Optional[bool] = None,
        class_names: Union[str, list[str]] = "voc",
        background: Union[str, list[str]] = "voc",
        templates: Sequence[str] = (CLIPES_TEMPLATE,),
        box_threshold: float = 0.4,
        affinity_layers: int = 8,
        bg_power: float = 1.0,
        output_dir: Optional[str] = None,
        save_cams: bool = True,
        preview_images: int = 8,
        crf: bool = False,
        crf_params: CRFParams = CRFParams(),
    ) -> None:
        super().__init__()
        # Plain attributes, not save_hyperparameters(): LightningCLI hands the *model's* hparams to
        # every LightningModule it builds, and this one is often nested under data.labeler.
        self.settings = {
            "model_name": model_name, "pretrained": pretrained, "quick_gelu": quick_gelu,
            "class_names": class_names, "background": background, "templates": list(templates),
            "box_threshold": box_threshold, "affinity_layers": affinity_layers, "bg_power": bg_power,
            "crf": crf, "crf_params": dataclasses.asdict(crf_params),
        }
        self.save_cams, self.preview_images = save_cams, preview_images
        self._crf_params = crf_params if crf else None
        if crf:
            require_crf()  # fail at start, with the install command, not after hours of labelling
        if pretrained is None:
            warnings.warn("CLIPESLabeler has random CLIP weights (pretrained=None): its masks are meaningless.", stacklevel=2)
        clip = load_clip(model_name, pretrained, quick_gelu)
        self.class_names = create_vocabulary(class_names)
        self.clipes = CLIPES(
            clip, self.class_names, create_background(background), check_templates(templates),
            box_threshold=box_threshold, affinity_layers=min(affinity_layers, len(clip.model.visual.transformer.resblocks)),
        )
        self.bg_power = bg_power
        self.output_dir = output_dir
        self.confmat_cam = segmentation_confmat(1 + len(self.class_names))
        self.confmat_caa = segmentation_confmat(1 + len(self.class_names))
        self.skipped: list[str] = []
        self.previews_written = 0

    # ----------------------------------------------------------------- helpers
    @property
    def crf_params(self) -> Optional[CRFParams]:
        """CRF settings when the CRF is on, else None."""
        return self._crf_params

    def describe(self) -> dict:
        """Everything that changes the labels (not where they are written)."""
        out = dict(self.settings, class_names=self.class_names)
        if not out["crf"]:
            out["crf_params"] = None
        return out

    def fingerprint(self, extra: Optional[dict] = None) -> str:
        """16 hex digits over :meth:`describe` (minus the weights' path) and the CLIP weights themselves."""
        h = hashlib.sha256()
        desc = {k: v for k, v in self.describe().items() if k != "pretrained"}
        h.update(json.dumps({**desc, **(extra or {})}, sort_keys=True, default=str).encode())
        for name, tensor in sorted(self.clipes.clip.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
        return h.hexdigest()[:16]

    def store(self) -> PseudoLabelStore:
        root = self.output_dir or Path(self.trainer.default_root_dir) / "pseudo_labels"
        return PseudoLabelStore(root, save_cams=self.save_cams)

    def _check_data(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        names = getattr(dm, "class_names", None)
        if names is not None and len(names) != len(self.class_names):
            raise ValueError(
                f"The data has {len(names)} classes but the labeler's vocabulary has {len(self.class_names)}; "
                "set --model.class_names to one prompt name per dataset class, in the same order."
            )

    def label_items(self, items: list[dict]) -> list[tuple[dict, ClassMaps]]:
        """Run CLIP-ES on the readable items of a batch; unreadable ones are counted and warned about."""
        ok = []
        for item in items:
            if item["error"] is not None:
                self.skipped.append(item["id"])
                warnings.warn(f"Skipping {item['id']}: {item['error']}", stacklevel=2)
            else:
                ok.append(item)
        if not ok:
            return []
        maps = self.clipes(
            [self.clipes.preprocess(it["image"]) for it in ok],
            [it["labels"] for it in ok],
            [it["image"].shape[:2] for it in ok],
        )
        return list(zip(ok, maps))

    # ----------------------------------------------------------------- predict
    def on_predict_start(self) -> None:
        self._check_data()
        self.store().write_meta({"labeler": self.describe()})

    def predict_step(self, batch: list[dict], batch_idx: int) -> None:
        store = self.store()
        todo = [it for it in batch if not store.is_done(it["id"])]
        for item, maps in self.label_items(todo):
            cams = maps.cams.cpu().numpy()
            mask, confidence = mask_and_confidence(maps.cams, maps.keys, self.bg_power)
            mask = mask.cpu().numpy().astype("uint8")
            store.write(item["id"], maps.keys.numpy(), cams, mask, confidence.cpu().numpy())
            if self.previews_written < self.preview_images:
                self.previews_written += 1
                buf = io.BytesIO()
                label_panel(item["image"], cams, mask, item["gt"]).save(buf, format="JPEG", quality=90)
                atomic_write_bytes(store.root / "preview" / f"{item['id']}.jpg", buf.getvalue())

    def on_predict_end(self) -> None:
        if self.skipped:
            warnings.warn(f"{len(self.skipped)} unreadable image(s) were skipped: {self.skipped[:5]}", stacklevel=2)

    # ---------------------------------------------------------------- validate
    def on_validation_start(self) -> None:
        self._check_data()

    def validation_step(self, batch: list[dict], batch_idx: int) -> None:
        for item, maps in self.label_items([it for it in batch if it["gt"] is not None or it["error"]]):
            gt = torch.from_numpy(item["gt"]).long().to(self.device)
            for confmat, cams in ((self.confmat_cam, maps.cams_raw), (self.confmat_caa, maps.cams)):
                pred = cams_to_label(cams.to(self.device), maps.keys.to(self.device), self.bg_power)
                confmat.update(pred.flatten(), gt.flatten())

    def on_validation_epoch_end(self) -> None:
        data_names = getattr(getattr(self.trainer, "datamodule", None), "class_names", None)
        names = ["background", *(data_names or [n.split(",")[0] for n in self.class_names])]
        for tag, confmat in (("_cam", self.confmat_cam), ("", self.confmat_caa)):
            per_class, miou = iou_from_confmat(confmat.compute())
            self.log(f"pseudo/mIoU{tag}", miou, sync_dist=False)
            if not tag:  # classes absent from both ground truth and prediction have no IoU
                for name, iou in zip(names, per_class):
                    if not torch.isnan(iou):
                        self.log(f"pseudo/IoU/{name}", iou)
            confmat.reset()
        if self.skipped:
            warnings.warn(f"{len(self.skipped)} unreadable image(s) skipped: {self.skipped[:5]}", stacklevel=2)
