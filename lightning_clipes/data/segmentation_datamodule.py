"""``SegmentationDataModule``: CLIP-ES pseudo-labels made inside the training job, then student data.

Before the first training step, rank 0 reads the split and checks it against the store (which entries
are current), every rank gets that same plan, and the ranks label the missing images together
(:mod:`lightning_clipes.data.pseudo_label_pass`) into a store keyed by the labeler and the data source;
then rank 0's list of labelled images is the training list of every rank.
"""
from __future__ import annotations

import json
import time
import uuid
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from lightning_clipes.components.pseudo_mask import apply_confidence_threshold
from lightning_clipes.data.pseudo_label_pass import RequeueRequested, plan_pass, requeue_slurm_job, run_pass
from lightning_clipes.data.segmentation_sets import (
    IGNORE_INDEX, FullImages, GroundTruthReader, PseudoLabelledCrops, train_transform,
)
from lightning_clipes.data.store import PseudoLabelStore, atomic_write_bytes
from lightning_clipes.data.store_key import source_identity
from lightning_clipes.data.labeler_datamodule import LabelerDataModule
from lightning_clipes.data.sources import ImageSource, SyntheticVOCSource, VOCSource
from lightning_clipes.data.toy_world import ToyWorldSource
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
        store_dir: where pseudo-label stores live; each labeler configuration (settings, weights, code)
            and data source gets its own subfolder, shared by every run that uses the same ones. Put it on
            a filesystem every node sees: ranks claim images one by one and write every file atomically.
        cache_dir: optional node-local folder (e.g. ``/tmp`` or ``$SLURM_TMPDIR``): after the
            labelling pass one process per node copies the masks there and training reads them
            from local disk.
        confidence_threshold: the confidence-guided loss threshold; pixels below it are ignored.
        crop_size, scale_range, hflip: training augmentation (random scale, crop, flip; method §6).
        color_jitter: colour jitter strength; 0 = off, as in the paper (``0.3`` is a common choice).
        batch_size: training crops per device; ``label_batch_size``: images per labeler call.
        num_workers: data-loading processes (``null`` = the CPUs of this task minus one, at most 8);
            ``crf_workers``: CRF processes during labelling (``null`` = the CPUs minus ``num_workers`` and one).
        skip_unreadable: leave out (and count) images that cannot be read instead of stopping.
        max_failed_fraction: stop with an error, before training, when more than this share of the
            split could not be labelled (unreadable files, images too large for the device).
        claim_timeout: seconds after which an image claimed by another host counts as abandoned.
        panel_pseudo_labels: the first this many images of ``val_split`` are labelled too, in memory, once
            per fit (rank 0), so that the student's validation panels show image | ground truth |
            pseudo-label | prediction (:attr:`panel_labels`); 0 = off.
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
        color_jitter: float = 0.0,
        batch_size: int = 8,
        label_batch_size: int = 8,
        num_workers: Optional[int] = None,
        crf_workers: Optional[int] = None,
        skip_unreadable: bool = True,
        cache_dir: Optional[str] = None,
        max_failed_fraction: float = 0.01,
        claim_timeout: float = 600.0,
        panel_pseudo_labels: int = 4,
    ) -> None:
        super().__init__(source, split, batch_size, num_workers, skip_unreadable)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        if not 0 <= confidence_threshold <= 1:
            raise ValueError(f"confidence_threshold must be in [0, 1], got {confidence_threshold}.")
        if not 0 <= max_failed_fraction <= 1:
            raise ValueError(f"max_failed_fraction must be in [0, 1], got {max_failed_fraction}.")
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
        self.max_failed_fraction, self.claim_timeout = max_failed_fraction, claim_timeout
        self.train_set: Optional[PseudoLabelledCrops] = None
        self.store: Optional[PseudoLabelStore] = None
        self.summary: dict = {}
        self.panel_pseudo_labels = panel_pseudo_labels
        self.panel_labels: dict[str, np.ndarray] = {}

    # ------------------------------------------------------------------ stages
    def setup(self, stage: Optional[str] = None) -> None:
        if stage in (None, "fit", "validate") and not hasattr(self, "val_set"):
            self.val_set = FullImages(self.build_dataset(self.val_split))
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self._train_set()
            self.panel_labels = self._panel_labels(self.val_set.images)
        if stage in ("test", "predict") and not hasattr(self, "test_set"):
            self.test_set = FullImages(self.build_dataset(self.test_split))

    def _broadcast(self, obj):
        trainer = self.trainer
        return trainer.strategy.broadcast(obj, src=0) if trainer is not None and trainer.world_size > 1 else obj

    def _train_set(self) -> PseudoLabelledCrops:
        rank = self.trainer.global_rank if self.trainer is not None else 0
        images = self._broadcast(self.build_dataset(self.split) if rank == 0 else None)  # one list for every rank
        if self.labeler is None:
            have_gt = [i for i, p in zip(images.ids, images.gt_paths) if p is not None]
            if not have_gt:
                raise FileNotFoundError(f"No ground-truth masks for split {self.split!r}; set data.labeler to make pseudo-labels.")
            warnings.warn("data.labeler is null: the student trains on GROUND-TRUTH masks (an oracle run).", stacklevel=2)
            ids, read = have_gt, GroundTruthReader(images)
        else:
            self.store, ids = self._pseudo_labels(images)
            read = self._node_local(ids).read if self.cache_dir is not None else self.store.read
        if not ids:
            raise RuntimeError(f"No training image of split {self.split!r} has a mask (the split has {len(images)} "
                               "images with labels); check the split file and the images it lists.")
        return PseudoLabelledCrops(images, ids, read, self.confidence_threshold, train_transform(**self.augment))

    def _pseudo_labels(self, images) -> tuple[PseudoLabelStore, list[str]]:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        device = trainer.strategy.root_device if trainer is not None else self.labeler.device
        if rank == 0:
            source = source_identity(self.source)
            key = self.labeler.fingerprint(extra={"source": source}, device=device)
            store = PseudoLabelStore(self.store_dir / key)
            store.clean_temporary()
            store.write_meta({"key": key, "identity": self.labeler.identity(device), "source": source,
                              "labeler": self.labeler.describe(device), "confidence": self.labeler.confidence_definition,
                              "written": time.strftime("%Y-%m-%d %H:%M:%S")})
            plan = plan_pass(images, store, pass_id=f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}")
            payload = (key, plan)
        key, plan = self._broadcast(payload if rank == 0 else None)
        store = PseudoLabelStore(self.store_dir / key)
        env = trainer._accelerator_connector.cluster_environment if trainer is not None else None
        requeue = isinstance(env, SLURMEnvironment) and env.auto_requeue
        if rank == 0:
            rank_zero_info(f"Pseudo-labels: {store.root} ({len(images) - len(plan.todo)} of {len(images)} images "
                           f"reused, {len(plan.todo)} to label)")
        try:
            stats = run_pass(
                self.labeler, images, plan, store, device, rank, world, self.label_batch_size, self.num_workers,
                self.crf_workers, progress=rank == 0, claim_timeout=self.claim_timeout, requeue=requeue,
            )
        except RequeueRequested:
            if rank == 0:
                status = requeue_slurm_job()
                print(f"SIGUSR1 during the labelling pass: finished entries are kept in {store.root}; "
                      f"scontrol requeue exited {status}, the requeued job labels the rest.", flush=True)
            raise SystemExit(0) from None
        # who labelled what, for people (and for tests): one folder per pass, one file per rank
        log = {"pass": plan.pass_id, "labelled": stats.labelled, "failed": stats.failed, "waited_s": round(stats.waited_s, 1)}
        atomic_write_bytes(store.root / "passes" / plan.pass_id / f"rank{rank}_of{world}.json",
                           json.dumps(log, indent=1).encode())
        if trainer is not None:
            trainer.strategy.barrier("clipes_pseudo_labels")  # every rank has waited for the store already
        verdict = self._training_list(images, plan, store) if rank == 0 else None
        ids, error = self._broadcast(verdict)
        if error:
            raise RuntimeError(error)
        self.summary = {"store": str(store.root), "images": len(images), "reused": len(images) - len(plan.todo),
                        "labelled": len(plan.todo) - (len(images) - len(ids)), "failed": len(images) - len(ids)}
        return store, ids

    def _panel_labels(self, images) -> dict[str, np.ndarray]:
        """Pseudo-labels of the first ``panel_pseudo_labels`` of ``images`` (the val split), for pictures only (not
        stored): id -> (H, W) uint8 mask with the pixels under the confidence threshold at 255, as the student's
        loss sees them."""
        trainer = self.trainer
        if self.labeler is None or self.panel_pseudo_labels <= 0 or (trainer is not None and trainer.global_rank != 0):
            return {}
        device = trainer.strategy.root_device if trainer is not None else self.labeler.device
        self.labeler.to(device)
        try:
            with self.labeler.labeller(crf_workers=0) as labeller:
                done = labeller([images[i] for i in range(min(self.panel_pseudo_labels, len(images)))])
                done += labeller.finish()
        finally:
            self.labeler.cpu()
        return {d.item["id"]: apply_confidence_threshold(d.mask, d.confidence, self.confidence_threshold, IGNORE_INDEX)
                for d in done}

    def _training_list(self, images, plan, store: PseudoLabelStore) -> tuple[list[str], Optional[str]]:
        """Rank 0's verdict after the pass: the images with a current entry, or why training must not start."""
        todo = set(plan.todo)
        ok = [image_id for i, image_id in enumerate(images.ids)
              if i not in todo or (plan.records[i] is not None and store.is_current(image_id, plan.records[i]))]
        missing = [image_id for image_id in images.ids if image_id not in set(ok)]
        if not missing:
            return ok, None
        reasons = [f"{i}: {store.failure(i, plan.pass_id) or 'no entry'}" for i in missing[:3]]
        message = (f"{len(missing)} of {len(images)} images of split {self.split!r} have no pseudo-label "
                   f"({'; '.join(reasons)}{' …' if len(missing) > 3 else ''}).")
        if len(missing) > self.max_failed_fraction * len(images):
            return ok, (f"{message} That is more than --data.max_failed_fraction={self.max_failed_fraction}: fix or "
                        "remove those images (or raise the fraction) and run again; labelled images are kept.")
        warnings.warn(f"{message} They are left out of training.", stacklevel=2)
        return ok, None

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
    """The whole job on the package's small synthetic VOC-format dataset (``train`` → ``val``), written by
    ``prepare_data`` on first use: a quick check of a pipeline (a random CLIP already scores well on
    it). The embedded default is :class:`ToyWorldDataModule`.

    Args:
        root: where the dataset is written. num_train, num_val, seed: its size and seed.
        Every other argument is :class:`SegmentationDataModule`'s (through ``**kwargs``), with CPU-sized
        defaults: crops of 64, scales 0.75-1.25, no loader workers, the CRF in this process.
    """

    def __init__(
        self,
        root: str = "outputs/synthetic/VOC2012",
        num_train: int = 32,
        num_val: int = 8,
        seed: int = 0,
        store_dir: str = "outputs/synthetic/pseudo_labels",
        crop_size: int = 64,
        scale_range: tuple[float, float] = (0.75, 1.25),
        num_workers: int = 0,
        crf_workers: Optional[int] = 0,
        **kwargs,
    ) -> None:
        kwargs.setdefault("split", "train")
        kwargs.setdefault("val_split", "val")
        super().__init__(SyntheticVOCSource(root, num_train, num_val, seed), store_dir=store_dir, crop_size=crop_size,
                         scale_range=scale_range, num_workers=num_workers, crf_workers=crf_workers, **kwargs)
        self.root = self.source.root


class ToyWorldDataModule(SegmentationDataModule):
    """The embedded default for the whole job: the package's toy world (``train`` → ``val``), written by
    ``prepare_data`` on first use (:mod:`lightning_clipes.data.toy_world`: ten classes, six backgrounds).

    Args:
        root: where the world is written. num_train, num_val, num_test, image_size, seed: its size,
            side and seed (the toy CLIP was trained on other scenes of seed 0).
        Every other argument is :class:`SegmentationDataModule`'s (through ``**kwargs``), with CPU-sized
        defaults: crops of 96 px (of 128 px images), scales 0.75-1.25, no loader workers, the CRF
        in this process.
    """

    def __init__(
        self,
        root: str = "outputs/synthetic/VOC2012",
        num_train: int = 400,
        num_val: int = 100,
        num_test: int = 0,
        image_size: int = 128,
        seed: int = 0,
        store_dir: str = "outputs/synthetic/pseudo_labels",
        crop_size: int = 96,
        scale_range: tuple[float, float] = (0.75, 1.25),
        num_workers: int = 0,
        crf_workers: Optional[int] = 0,
        **kwargs,
    ) -> None:
        kwargs.setdefault("split", "train")
        kwargs.setdefault("val_split", "val")
        super().__init__(ToyWorldSource(root, num_train, num_val, num_test, image_size, seed), store_dir=store_dir,
                         crop_size=crop_size, scale_range=scale_range, num_workers=num_workers,
                         crf_workers=crf_workers, **kwargs)
        self.root = self.source.root
