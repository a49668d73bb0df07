"""Data for the labeler's commands: every image of a split with its image-level labels."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import lightning as L
from torch.utils.data import DataLoader, Dataset

from lightning_clipes.data.sources import ImageSource, SyntheticVOCSource, VOCSource
from lightning_clipes.data.voc_format import VOC_CLASSES, ImageReadError, load_mask, load_rgb


class LabeledImages(Dataset):
    """Images with image-level labels (and ground truth where there is some).

    An item is a dict: ``id`` (str), ``path`` (the image file), ``image`` ((H, W, 3) uint8 RGB),
    ``labels`` (list of 0-based class indices), ``gt`` ((H, W) uint8 or None), ``pixels`` (the
    labeller's input from ``transform``, made in the loader's worker, or None) and ``error`` (None, or
    why the image could not be read when ``skip_unreadable`` is set; ``image`` is then None).
    """

    def __init__(
        self,
        ids: Sequence[str],
        labels: Sequence[Sequence[int]],
        image_paths: Sequence[Path],
        gt_paths: Sequence[Optional[Path]],
        skip_unreadable: bool = False,
        transform: Optional[Callable[[Any], Any]] = None,
    ) -> None:
        self.ids, self.labels = list(ids), [list(x) for x in labels]
        self.image_paths, self.gt_paths = [Path(p) for p in image_paths], list(gt_paths)
        self.skip_unreadable = skip_unreadable
        self.transform = transform

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {"id": self.ids[i], "path": self.image_paths[i], "labels": self.labels[i], "image": None,
                "gt": None, "pixels": None, "error": None}
        try:
            item["image"] = load_rgb(self.image_paths[i])
            if self.gt_paths[i] is not None:
                item["gt"] = load_mask(self.gt_paths[i])
        except (ImageReadError, FileNotFoundError) as err:
            if not self.skip_unreadable:
                raise
            item["image"], item["error"] = None, str(err)
        if item["image"] is not None and self.transform is not None:
            item["pixels"] = self.transform(item["image"])
        return item

    def subset(self, keep: Sequence[int]) -> "LabeledImages":
        """The images at positions ``keep``, in that order."""
        pick = lambda seq: [seq[i] for i in keep]  # noqa: E731
        return LabeledImages(pick(self.ids), pick(self.labels), pick(self.image_paths), pick(self.gt_paths),
                             self.skip_unreadable, self.transform)

    def without(self, ids: Sequence[str]) -> "LabeledImages":
        """All images but ``ids``."""
        drop = set(ids)
        return self.subset([i for i, image_id in enumerate(self.ids) if image_id not in drop])


def default_workers() -> int:
    """Loader processes when none are asked for: the CPUs of this job (SLURM's per-task count or the affinity
    mask) minus one for the main process, at most 8 (1 on a 2-core laptop, not 4)."""
    from lightning_clipes.components.labelling import available_cpus

    return max(0, min(8, available_cpus() - 1))


def collate_items(items: list[dict]) -> list[dict]:
    """Images differ in size: a batch is the list of items."""
    return items


class LabelerDataModule(L.LightningDataModule):
    """Every image of one split with its image-level labels, for the labeler's ``predict``/``validate``.

    Args:
        source: where images, labels and ground truth come from (:mod:`lightning_clipes.data.sources`).
        split: the split to label.
        batch_size: images per labeler call (same-size images share one forward/backward).
        num_workers: image decoding processes; ``null`` = the CPUs this job has minus one, at most 8.
        skip_unreadable: skip (and count) images that are missing or cannot be decoded instead of
            stopping with an error that names the file.
    """

    def __init__(
        self,
        source: ImageSource,
        split: str = "train",
        batch_size: int = 8,
        num_workers: Optional[int] = None,
        skip_unreadable: bool = False,
    ) -> None:
        super().__init__()
        self.source = source
        self.split = split
        self.batch_size = batch_size
        self.num_workers = default_workers() if num_workers is None else num_workers
        self.skip_unreadable = skip_unreadable
        self.dataset: Optional[LabeledImages] = None
        # images predict leaves out (already current in the store), set by the labeler's setup for each
        # predict; the dataset itself stays whole, so a later predict or validate in this process sees every image
        self.skip_ids: frozenset[str] = frozenset()

    @property
    def class_names(self) -> list[str]:
        """Foreground class names, index = class index (masks use index + 1)."""
        return list(self.source.class_names)

    @property
    def num_classes(self) -> int:
        """Classes including background (index 0)."""
        return 1 + len(self.class_names)

    def prepare_data(self) -> None:
        self.source.prepare()

    def build_dataset(self, split: str) -> LabeledImages:
        """Read a split; images without labels are left out with a warning."""
        data = self.source.read(split)
        keep = [i for i, lab in enumerate(data.labels) if lab]
        unlabeled = [data.ids[i] for i, lab in enumerate(data.labels) if not lab]
        if unlabeled:
            warnings.warn(
                f"{len(unlabeled)} image(s) of split {split!r} have no labelled object and are skipped: "
                f"{', '.join(unlabeled[:5])}{' …' if len(unlabeled) > 5 else ''}",
                stacklevel=2,
            )
        return LabeledImages(data.ids, data.labels, data.image_paths, data.gt_paths, self.skip_unreadable).subset(keep)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.dataset is None:
            self.dataset = self.build_dataset(self.split)
        if stage in ("validate", "test") and not any(p is not None for p in self.dataset.gt_paths):
            raise FileNotFoundError(
                f"No ground-truth masks for split {self.split!r}; validate needs them. "
                "Use predict to only write pseudo-labels."
            )

    def _loader(self, skip: frozenset[str] = frozenset()) -> DataLoader:
        assert self.dataset is not None, "call setup() first"
        dataset = self.dataset.without(skip) if skip else self.dataset
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                          collate_fn=collate_items)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.skip_ids)

    def val_dataloader(self) -> DataLoader:
        return self._loader()

    def test_dataloader(self) -> DataLoader:
        return self._loader()


class VOCDataModule(LabelerDataModule):
    """The labeler's data on the PASCAL VOC 2012 layout (see :class:`~lightning_clipes.data.sources.VOCSource`).

    Args:
        root: the ``VOC2012`` folder (the one holding ``JPEGImages/``).
        split: ``train``, ``train_aug``, ``val``, … (``ImageSets/Segmentation/<split>.txt``).
        class_names: the class names used in the XML files, in class-index order.
        Other arguments as :class:`LabelerDataModule`.
    """

    def __init__(
        self,
        root: str,
        split: str = "train",
        class_names: Sequence[str] = VOC_CLASSES,
        batch_size: int = 8,
        num_workers: Optional[int] = None,
        skip_unreadable: bool = False,
    ) -> None:
        super().__init__(VOCSource(root, class_names), split, batch_size, num_workers, skip_unreadable)
        self.root = self.source.root


class SyntheticVOCDataModule(LabelerDataModule):
    """The package's small synthetic VOC-format dataset (three classes, large objects), written on first
    use: a quick check of a pipeline. A random CLIP already scores well on it; the embedded default
    is the toy world (:class:`~lightning_clipes.data.segmentation_datamodule.ToyWorldDataModule`).

    Args:
        root: where to write it. num_train, num_val: images in ``train`` and ``val``. seed: its seed.
        Other arguments as :class:`LabelerDataModule`.
    """

    def __init__(
        self,
        root: str = "outputs/synthetic/VOC2012",
        split: str = "train",
        num_train: int = 16,
        num_val: int = 8,
        seed: int = 0,
        batch_size: int = 8,
        num_workers: int = 0,
        skip_unreadable: bool = False,
    ) -> None:
        super().__init__(SyntheticVOCSource(root, num_train, num_val, seed), split, batch_size, num_workers, skip_unreadable)
        self.root = self.source.root
