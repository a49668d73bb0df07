"""``SegmentationDataModule``: CLIP-ES pseudo-labels made inside the training job, then student data.

Before the first training step every rank labels its own shard of the train split with the frozen
labeler on its own device, writes to a store keyed by the labeler's fingerprint, and waits for the
others at a barrier; training then reads masks and confidences from the store.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Optional, Sequence

from torch.utils.data import DataLoader

from lightning_clipes.data.pseudo_label_pass import fill_store
from lightning_clipes.data.segmentation_sets import FullImages, GroundTruthReader, PseudoLabelledCrops, train_transform
from lightning_clipes.data.store import PseudoLabelStore, atomic_write_bytes
from lightning_clipes.data.labeler_datamodule import LabelerDataModule
from lightning_clipes.data.sources import ImageSource, SyntheticVOCSource, VOCSource
from lightning_clipes.data.voc_format import VOC_CLASSES
from lightning_clipes.labeler import CLIPESLabeler


class SegmentationDataModule(LabelerDataModule):
    """Student data from any image source, with pseudo-labels from ``labeler``.

    Args:
        source: where images, image-level labels and ground truth come from.
        split: the training split, pseudo-labelled in the job (``train_aug`` for the paper's VOC student).
        val_split: the split with ground truth for ``val/mIoU``.
        test_split: the split ``test``/``predict`` run on (default: ``val_split``).
        labeler: the frozen CLIP-ES labeler; ``None`` trains on ground-truth masks instead (an
            oracle run, for plumbing checks).
        store_dir: where pseudo-label stores live; each labeler configuration (and its weights)
            gets its own subfolder, shared by every run that uses the same labeler. Put it on a
            filesystem every node sees: ranks write disjoint shards, every file atomically.
        cache_dir: optional node-local folder (e.g. ``/tmp`` or ``$SLURM_TMPDIR``): after the
            labelling pass one process per node copies the masks there and training reads them
            from local disk.
        confidence_threshold: the confidence-guided loss threshold; pixels below it are ignored.
        crop_size, scale_range, hflip, color_jitter: training augmentation.
        batch_size: training crops per device; ``label_batch_size``: images per labeler call.
        num_workers: data-loading processes; ``crf_workers``: CRF processes during labelling.
        skip_unreadable: leave out (and count) images that cannot be read instead of stopping.
    """

    def __init__(
        self,
        source: ImageSource,
        split: str = "train",
        val_split: str = "val",
        test_split: Optional[str] = None,
        labeler: Optional[CLIPESLabeler] = None,
        store_dir: str = "outputs/pseudo_labels",
        confidence_threshold: float = 0.95,
        crop_size: int = 512,
        scale_range: tuple[float, float] = (0.5, 1.5),
        hflip: bool = True,
        color_jitter: float = 0.3,
        batch_size: int = 8,
        label_batch_size: int = 8,
        num_workers: int = 4,
        crf_workers: int = 2,
        skip_unreadable: bool = True,
        cache_dir: Optional[str] = None,
    ) -> None:
        super().__init__(source, split, batch_size, num_workers, skip_unreadable)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        if not 0 <= confidence_threshold <= 1:
            raise ValueError(f"confidence_threshold must be in [0, 1], got {confidence_threshold}.")
        if labeler is not None and len(labeler.class_names) != len(self.class_names):
            raise ValueError(
                f"The labeler has {len(labeler.class_names)} classes and the data {len(self.class_names)}; "
                "give the labeler one prompt name per dataset class, in the same order."
            )
        self.val_split, self.test_split = val_split, test_split or val_split
        self.labeler = labeler
        self.store_dir = Path(store_dir)
        self.confidence_threshold = confidence_threshold
        self.augment = dict(crop_size=crop_size, scale_range=tuple(scale_range), hflip=hflip, color_jitter=color_jitter)
        self.label_batch_size, self.crf_workers = label_batch_size, crf_workers
        self.train_set: Optional[PseudoLabelledCrops] = None
        self.store: Optional[PseudoLabelStore] = None

    # ------------------------------------------------------------------ stages
    def setup(self, stage: Optional[str] = None) -> None:
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self._train_set()
        if stage in (None, "fit", "validate") and not hasattr(self, "val_set"):
            self.val_set = FullImages(self.build_dataset(self.val_split))
        if stage in ("test", "predict") and not hasattr(self, "test_set"):
            self.test_set = FullImages(self.build_dataset(self.test_split))

    def _train_set(self) -> PseudoLabelledCrops:
        images = self.build_dataset(self.split)
        if self.labeler is None:
            have_gt = [i for i, p in zip(images.ids, images.gt_paths) if p is not None]
            if not have_gt:
                raise FileNotFoundError(f"No ground-truth masks for split {self.split!r}; set data.labeler to make pseudo-labels.")
            warnings.warn("data.labeler is null: the student trains on GROUND-TRUTH masks (an oracle run).", stacklevel=2)
            ids, read = have_gt, GroundTruthReader(images)
        else:
            self.store = self._pseudo_labels(images)
            ids = [i for i in images.ids if self.store.is_done(i)]
            missing = len(images) - len(ids)
            if missing:
                warnings.warn(f"{missing} of {len(images)} training images have no pseudo-label and are left out.", stacklevel=2)
            read = self._node_local(ids).read if self.cache_dir is not None else self.store.read
        if not ids:
            raise RuntimeError(f"No training image of split {self.split!r} has a mask; see the warnings above.")
        return PseudoLabelledCrops(images, ids, read, self.confidence_threshold, train_transform(**self.augment))

    def _pseudo_labels(self, images) -> PseudoLabelStore:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        device = trainer.strategy.root_device if trainer is not None else self.labeler.device
        data = {"source": describe_source(self.source), "split": self.split}
        fingerprint = self.labeler.fingerprint(extra=data)
        store = PseudoLabelStore(self.store_dir / fingerprint, save_cams=False)
        if rank == 0:
            store.write_meta({"labeler": self.labeler.describe(), **data})
        stats = fill_store(
            self.labeler, images, store, device, rank, world, self.label_batch_size,
            self.num_workers, self.crf_workers, progress=rank == 0,
        )
        # who labelled what, for people (and for the DDP test): one file per rank and pass
        log = store.root / "passes" / f"rank{rank}_of{world}.json"
        atomic_write_bytes(log, json.dumps(stats, indent=1).encode())
        if trainer is not None:
            trainer.strategy.barrier("clipes_pseudo_labels")
        return store

    def _node_local(self, ids: list[str]) -> PseudoLabelStore:
        """Mirror the store to ``cache_dir`` once per node, then every process reads the local copy."""
        local_root = self.cache_dir / self.store.root.name
        trainer = self.trainer
        if trainer is None or trainer.local_rank == 0:
            self.store.mirror_to(local_root, ids)
        if trainer is not None:
            trainer.strategy.barrier("clipes_node_cache")
        return PseudoLabelStore(local_root, save_cams=False)

    # ------------------------------------------------------------- dataloaders
    def train_dataloader(self) -> DataLoader:
        # drop the last, smaller batch (batch-norm cannot train on a batch of one) unless it is all there is
        world = self.trainer.world_size if self.trainer is not None else 1
        per_rank = len(self.train_set) // world
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=per_rank >= self.batch_size,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=1, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=1, num_workers=self.num_workers)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()


def describe_source(source: ImageSource) -> dict:
    """The source's class and settings (paths resolved), for the store's fingerprint and meta.json."""
    settings = {k: str(Path(v).resolve()) if isinstance(v, Path) else v for k, v in vars(source).items()
                if not k.startswith("_") and k not in ("class_names", "prompt_names")}
    return {"class": type(source).__name__, **{k: str(v) for k, v in settings.items()}}


class VOCSegmentationDataModule(SegmentationDataModule):
    """:class:`SegmentationDataModule` on the PASCAL VOC 2012 layout (``train_aug`` → ``val`` by default).

    Args:
        root: the ``VOC2012`` folder.
        class_names: the class names used in the XML files, in class-index order.
        Every other argument is :class:`SegmentationDataModule`'s (LightningCLI reads them through
        ``**kwargs``).
    """

    def __init__(self, root: str, split: str = "train_aug", class_names: Sequence[str] = VOC_CLASSES, **kwargs) -> None:
        super().__init__(VOCSource(root, class_names), split, **kwargs)
        self.root = self.source.root


class SyntheticSegmentationDataModule(SegmentationDataModule):
    """The embedded default for the whole job: the package's synthetic VOC-format dataset
    (``train`` → ``val``), written by ``prepare_data`` on first use. Arguments as
    :class:`SegmentationDataModule`, plus the dataset's ``num_train``, ``num_val`` and ``seed``."""

    def __init__(
        self,
        root: str = "outputs/synthetic/VOC2012",
        labeler: Optional[CLIPESLabeler] = None,
        store_dir: str = "outputs/synthetic/pseudo_labels",
        num_train: int = 32,
        num_val: int = 8,
        seed: int = 0,
        confidence_threshold: float = 0.95,
        crop_size: int = 64,
        scale_range: tuple[float, float] = (0.75, 1.25),
        batch_size: int = 8,
        num_workers: int = 0,
    ) -> None:
        super().__init__(
            SyntheticVOCSource(root, num_train, num_val, seed), "train", "val", None, labeler, store_dir,
            confidence_threshold, crop_size, scale_range, batch_size=batch_size, label_batch_size=8,
            num_workers=num_workers,
        )
        self.root = self.source.root
