"""``CLIPESLabeler``: the frozen CLIP-ES labeler as a LightningModule.

``predict`` writes pseudo-labels to a :class:`~lightning_clipes.data.store.PseudoLabelStore` (resumable,
keyed by the settings), ``validate`` scores every stage against ground truth (``pseudo/mIoU_cam``,
``pseudo/mIoU_caa``, ``pseudo/mIoU_crf``). Both run the one labelling function of
:mod:`lightning_clipes.components.labelling`, as does the pass inside ``fit``.
"""
from __future__ import annotations

import dataclasses
import io
import time
import uuid
import warnings
from pathlib import Path
from typing import Literal, Optional, Sequence, Union

import lightning as L
import torch

from lightning_clipes.cluster import launcher_rank_zero
from lightning_clipes.components.clip_loader import load_clip
from lightning_clipes.components.clipes import CLIPES, resolve_precision
from lightning_clipes.components.crf import CRFParams, require_crf
from lightning_clipes.components.labelling import (
    CONFIDENCE_CRF, CONFIDENCE_NO_CRF, LabelledImage, Labeller, available_cpus,
)
from lightning_clipes.components.prompts import CLIPES_TEMPLATE, check_templates, create_background, create_vocabulary
from lightning_clipes.data.labeler_datamodule import LabelerDataModule
from lightning_clipes.data.store import ClaimOwner, PseudoLabelStore, StoreWriter, atomic_write_bytes, image_record
from lightning_clipes.data.store_key import digest, labeler_identity, weights_digest
from lightning_clipes.metrics import iou_from_confmat, segmentation_confmat
from lightning_clipes.visualize import label_panel


class CLIPESLabeler(L.LightningModule):
    """Image + image-level labels -> refined class maps, pseudo-masks and their confidence, with a frozen CLIP.

    Args:
        model_name: open_clip ViT name (architecture of tags and open_clip checkpoints).
        pretrained: open_clip pretrained tag (``openai``), path to OpenAI's ``ViT-B-16.pt`` (TorchScript
            or state dict) or to an open_clip checkpoint; ``null`` = random weights (meaningless masks).
        quick_gelu: ``null`` = automatic (QuickGELU for OpenAI-format files); see ``load_clip``.
        class_names: ``voc``, ``coco``, a class-list file or a list of prompt names in the dataset's class order.
        background: ``voc``, ``coco``, ``none`` or a list of background words.
        templates: prompt templates; several are averaged.
        box_threshold: CAA box threshold (0.4 VOC, 0.7 COCO).
        affinity_layers: last blocks whose attention forms the affinity (8 in the paper).
        bg_power: background exponent t in ``(1 - max cam)^t`` (the reference's CRF path uses 1).
        gradcam: ``softmax`` (CLIP-ES) or ``plain`` (GradCAM of the raw logit, the paper's ablation).
        softmax_logit_scale: the scale of the cosine similarities in GradCAM's softmax; ``null`` = the
            CLIP's own (method §3). The toy CLIP's learned 19.5 saturates it (experiments/synthetic.yaml).
        crf: refine the training masks with the dense CRF and take confidence = max Q (the paper's
            pipeline, default); ``false`` = the CAA argmax with our own confidence (the winning share of
            [background, cams]; the paper defines none without the CRF).
        crf_params: the CRF's settings (the paper's by default).
        crf_workers: CRF processes for predict/validate; ``null`` = the CPUs this job has (SLURM's
            per-task count or the affinity mask) minus the data loader's workers and one, 0 on 2 CPUs.
        max_side: cap on the long side of CLIP's input, in pixels (maps and masks stay at full size);
            VOC (≤ 500) and COCO (≤ 640) are never capped, a 5000×4000 photo costs a 1024 px image.
        precision: ``auto`` (float16 autocast on CUDA like the reference's half-precision CLIP; float32
            on CPU, the reference's precision there, although bf16 is about 2x faster on CPUs with bf16
            units), ``32``, ``bf16`` or ``16``.
        reference_order: GradCAM and CAA in the reference's arithmetic order, the text tower over all
            77 tokens (slower; for the parity check).
        output_dir: predict's store; default ``<trainer.default_root_dir>/pseudo_labels``. A folder made
            with other settings is refused, naming the difference.
        save_cams: keep the float16 CAA cams (``cams/<id>.npz``, the reference's ``attn_highres``).
        preview_images: write ``preview/<id>.jpg`` (image | strongest cam | mask | ground truth) for this
            many images per process.
        confidence_threshold: the confidence-guided loss threshold whose coverage ``validate`` reports
            (``pseudo/confident_fraction`` and ``pseudo/confident_accuracy``); the student's own threshold
            is the data module's.
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
        gradcam: Literal["softmax", "plain"] = "softmax",
        softmax_logit_scale: Optional[float] = None,
        crf: bool = True,
        crf_params: CRFParams = CRFParams(),
        crf_workers: Optional[int] = None,
        max_side: Optional[int] = 1024,
        precision: Literal["auto", "32", "bf16", "16"] = "auto",
        reference_order: bool = False,
        output_dir: Optional[str] = None,
        save_cams: bool = True,
        preview_images: int = 8,
        confidence_threshold: float = 0.95,
    ) -> None:
        super().__init__()
        if crf:
            require_crf()  # fail at start, with the install command, not after hours of labelling
        if pretrained is None and launcher_rank_zero():  # once per job; here, not at jsonargparse's call site
            warnings.warn("CLIPESLabeler has random CLIP weights (pretrained=None): its masks are meaningless.",
                          stacklevel=1)
        if gradcam not in ("softmax", "plain"):
            raise ValueError(f"gradcam must be 'softmax' or 'plain', got {gradcam!r}.")
        clip = load_clip(model_name, pretrained, quick_gelu)
        self.class_names = create_vocabulary(class_names)
        background_words = create_background(background)
        depth = len(clip.model.visual.transformer.resblocks)
        self.clipes = CLIPES(
            clip, self.class_names, background_words, check_templates(templates), box_threshold=box_threshold,
            affinity_layers=min(affinity_layers, depth), softmax=gradcam == "softmax", max_side=max_side,
            logit_scale=softmax_logit_scale, precision=precision, reference_order=reference_order,
        )
        # Plain attributes, not save_hyperparameters(): LightningCLI hands the *model's* hparams to
        # every LightningModule it builds, and this one is often nested under data.labeler.
        self.settings = {
            "model_name": model_name, "pretrained": pretrained, "quick_gelu": quick_gelu,
            "class_names": self.class_names, "background": background_words, "templates": list(templates),
            "box_threshold": box_threshold, "affinity_layers": min(affinity_layers, depth), "bg_power": bg_power,
            "gradcam": gradcam, "crf": dataclasses.asdict(crf_params) if crf else None, "max_side": max_side,
            "precision": precision, "reference_order": reference_order,
            # only when set, so that the stores of labelers at the CLIP's own scale keep their keys
            **({"softmax_logit_scale": softmax_logit_scale} if softmax_logit_scale is not None else {}),
        }
        self.bg_power, self.crf_workers = bg_power, crf_workers
        self._crf_params = crf_params if crf else None
        self.output_dir, self.save_cams, self.preview_images = output_dir, save_cams, preview_images
        self.confidence_threshold = confidence_threshold
        self._weights_digest: Optional[str] = None
        stages = ("cam", "caa", "crf") if crf else ("cam", "caa")
        self.confmats = torch.nn.ModuleDict({s: segmentation_confmat(1 + len(self.class_names)) for s in stages})
        self.register_buffer("coverage", torch.zeros(3, dtype=torch.float64), persistent=False)  # pixels, confident, right
        self.failed: dict[str, str] = {}
        self.previews_written = self.reused = 0

    # ----------------------------------------------------------------- the labelling function
    @property
    def crf_params(self) -> Optional[CRFParams]:
        """CRF settings when the CRF is on, else None."""
        return self._crf_params

    def labeller(self, keep_stages: bool = False, keep_cams: bool = False, loader_workers: int = 0,
                 crf_workers: Optional[int] = None) -> Labeller:
        """The labelling function on this module's device (see :mod:`lightning_clipes.components.labelling`)."""
        workers = self.crf_workers if crf_workers is None else crf_workers
        if workers is None:
            cpus = available_cpus()
            workers = 0 if cpus <= 2 else max(1, cpus - loader_workers - 1)
        return Labeller(self.clipes, self.bg_power, self._crf_params, workers, keep_stages, keep_cams)

    def describe(self, device: Optional[torch.device] = None) -> dict:
        """Everything that changes the labels (not where they are written), with ``precision`` resolved
        for ``device`` (default: where the module is)."""
        return dict(self.settings, precision=resolve_precision(self.settings["precision"], device or self.device))

    def identity(self, device: Optional[torch.device] = None) -> dict:
        """Settings, weights digest, code digest and store format: what a store is keyed by."""
        if self._weights_digest is None:
            self._weights_digest = weights_digest(self.clipes.clip.state_dict())
        return labeler_identity(self.describe(device), self._weights_digest)

    def fingerprint(self, extra: Optional[dict] = None, device: Optional[torch.device] = None) -> str:
        """16 hex digits over :meth:`identity` and ``extra`` (the in-job store adds the data source)."""
        return digest({**self.identity(device), **(extra or {})})

    def _check_data(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        names = getattr(dm, "class_names", None)
        if names is not None and len(names) != len(self.class_names):
            raise ValueError(
                f"The data has {len(names)} classes but the labeler's vocabulary has {len(self.class_names)}; "
                "set --model.class_names to one prompt name per dataset class, in the same order."
            )

    # ----------------------------------------------------------------- predict
    def store(self) -> PseudoLabelStore:
        root = self.output_dir or Path(self.trainer.default_root_dir) / "pseudo_labels"
        return PseudoLabelStore(root, save_cams=self.save_cams)

    def setup(self, stage: str) -> None:
        if stage not in ("predict", "validate"):
            return
        self._check_data()
        dm = self.trainer.datamodule
        dataset = getattr(dm, "dataset", None)
        if dataset is not None:  # resizing and normalising happen in the loader's workers
            dataset.transform = self.clipes.preprocessor
        if stage != "predict":
            return
        store, identity = self.store(), self.identity()
        check_store_identity(store, identity)
        if dataset is not None:  # skip what is already done before any image is decoded
            current = [i for i, path, labels in zip(dataset.ids, dataset.image_paths, dataset.labels)
                       if _is_current(store, i, path, labels)]
            if isinstance(dm, LabelerDataModule):
                dm.skip_ids = frozenset(current)
            else:  # a datamodule of the user's own: its predict loader reads .dataset
                dm.dataset = dataset.without(current)
            self.reused = len(current)
        if self.trainer.is_global_zero:
            store.clean_temporary()
            store.write_meta({"identity": identity, "key": digest(identity), "labeler": self.describe(),
                              "confidence": self.confidence_definition, "written": time.strftime("%Y-%m-%d %H:%M:%S")})

    @property
    def confidence_definition(self) -> str:
        """What the stored confidence is (for meta.json)."""
        return CONFIDENCE_CRF if self._crf_params is not None else CONFIDENCE_NO_CRF

    def on_predict_start(self) -> None:
        store = self.store()
        self._owner = ClaimOwner.here(f"predict-{uuid.uuid4().hex[:8]}")
        self._writer = StoreWriter(store, on_written=lambda i: store.release(i, self._owner))
        loader_workers = getattr(self.trainer.datamodule, "num_workers", 0)
        self._labeller = self.labeller(keep_cams=self.save_cams or self.preview_images > 0, loader_workers=loader_workers)

    def predict_step(self, batch: list[dict], batch_idx: int) -> list[str]:
        """Label the batch's images that no other process has claimed. Returns their ids: each is written to
        the store by the end of the pass (the labeller may still hold it in its CRF workers when the step
        returns), unless it ends up in ``failed``."""
        store = self.store()
        todo = []
        for item in batch:
            if item.get("error") is None and store.claim(item["id"], self._owner):
                todo.append(item)
            elif item.get("error") is not None:
                todo.append(item)  # reported by the labeller as failed
        self._write(self._labeller(todo))
        return [item["id"] for item in todo]

    def _write(self, results: list[LabelledImage]) -> None:
        store = self.store()
        for done in results:
            item = done.item
            record = image_record(item["path"], item["labels"])
            self._writer.write(item["id"], record, done.keys, done.mask, done.confidence, cams=done.cams)
            if self.previews_written < self.preview_images:
                self.previews_written += 1
                buf = io.BytesIO()
                label_panel(item["image"], done.cams, done.mask, item["gt"]).save(buf, format="JPEG", quality=90)
                atomic_write_bytes(store.root / "preview" / f"{item['id']}.jpg", buf.getvalue())
            elif not self.save_cams:
                self._labeller.keep_cams = False

    def on_predict_end(self) -> None:
        try:
            self._write(self._labeller.finish())
            self._writer.close()
        finally:
            self._labeller.close()
        store = self.store()
        for image_id in self._labeller.failed:
            store.release(image_id, self._owner)
        self.failed.update(self._labeller.failed)
        if self.failed:
            warnings.warn(f"{len(self.failed)} image(s) could not be labelled: "
                          + "; ".join(f"{k}: {v}" for k, v in list(self.failed.items())[:5]), stacklevel=1)

    # ---------------------------------------------------------------- validate
    def on_validation_start(self) -> None:
        loader_workers = getattr(self.trainer.datamodule, "num_workers", 0)
        self._labeller = self.labeller(keep_stages=True, loader_workers=loader_workers)

    def validation_step(self, batch: list[dict], batch_idx: int) -> None:
        self._score(self._labeller([it for it in batch if it["gt"] is not None or it.get("error")]))

    def _score(self, results: list[LabelledImage]) -> None:
        for done in results:
            gt = torch.from_numpy(done.item["gt"]).long().to(self.device).flatten()
            for stage, pred in done.stages.items():
                self.confmats[stage].update(pred.to(self.device).flatten(), gt)
            valid = gt != 255
            # in float64, as the store compares: float32 would round the threshold 0.95 down to 0.94999999
            confident = torch.from_numpy(done.confidence.astype("float64") >= self.confidence_threshold)
            confident = confident.to(self.device).flatten() & valid
            right = confident & (torch.from_numpy(done.mask).to(self.device).flatten().long() == gt)
            self.coverage += torch.stack([valid.sum(), confident.sum(), right.sum()]).double()

    def on_validation_epoch_end(self) -> None:
        self._score(self._labeller.finish())
        self._labeller.close()
        data_names = getattr(getattr(self.trainer, "datamodule", None), "class_names", None)
        names = ["background", *(data_names or [n.split(",")[0] for n in self.class_names])]
        final = "crf" if "crf" in self.confmats else "caa"
        for stage, confmat in self.confmats.items():
            per_class, miou = iou_from_confmat(confmat.compute())  # summed over ranks by torchmetrics
            # every rank holds the same reduced value; sync_dist averages identical values (and keeps
            # Lightning from advising it on every rank)
            self.log(f"pseudo/mIoU_{stage}", float(miou), sync_dist=True)
            if stage == final:
                self.log("pseudo/mIoU", float(miou), prog_bar=True, sync_dist=True)
                for name, iou in zip(names, per_class):  # classes absent from ground truth and prediction: NaN
                    if not torch.isnan(iou):
                        self.log(f"pseudo/IoU/{name}", float(iou), sync_dist=True)
            confmat.reset()
        pixels, confident, right = self.trainer.strategy.reduce(self.coverage, reduce_op="sum").tolist()
        self.log("pseudo/confident_fraction", confident / max(pixels, 1.0), sync_dist=True)
        self.log("pseudo/confident_accuracy", right / max(confident, 1.0), sync_dist=True)
        self.coverage.zero_()
        self.failed.update(self._labeller.failed)
        if self.failed:
            warnings.warn(f"{len(self.failed)} image(s) could not be labelled: {list(self.failed)[:5]}", stacklevel=1)


def _is_current(store: PseudoLabelStore, image_id: str, path: Path, labels) -> bool:
    try:
        return store.is_current(image_id, image_record(path, labels))
    except OSError:  # missing or unreadable: labelling it reports the error
        return False


def check_store_identity(store: PseudoLabelStore, identity: dict) -> None:
    """Refuse a store folder made with other settings, weights or code, naming what differs."""
    meta = store.read_meta()
    if meta is None or "identity" not in meta or meta["identity"] == identity:
        if meta is not None and "identity" not in meta and (store.root / "masks").is_dir():
            raise ValueError(f"{store.root} holds pseudo-labels of an older lightning_clipes (no identity in meta.json); "
                             "delete the folder or choose another --model.output_dir.")
        return
    old, new = meta["identity"], identity
    diffs = [f"{k}: {old['settings'].get(k)!r} there, {v!r} now" for k, v in new["settings"].items()
             if old["settings"].get(k) != v]
    for key, what in (("weights_sha256", "CLIP weights"), ("code", "labelling code version"), ("store_format", "store format")):
        if old.get(key) != new.get(key):
            diffs.append(f"{what} differ")
    raise ValueError(
        f"{store.root} holds pseudo-labels made with other settings ({'; '.join(diffs)}). Choose another "
        "--model.output_dir (or --trainer.default_root_dir), or delete that folder to relabel."
    )
