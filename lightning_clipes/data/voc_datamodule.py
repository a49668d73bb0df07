"""VOC-layout data for the labeler: every image of a split with its image-level labels."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
from torch.utils.data import DataLoader, Dataset

from lightning_clipes.data.synthetic import ensure_synthetic_voc
from lightning_clipes.data.voc_format import (
    VOC_CLASSES,
    ImageReadError,
    ground_truth_path,
    load_mask,
    load_rgb,
    parse_labels,
    read_split,
)


class LabeledImages(Dataset):
    """Images with image-level labels (and ground truth where there is some).

    An item is a dict: ``id`` (str), ``image`` ((H, W, 3) uint8 RGB), ``labels`` (list of 0-based
    class indices), ``gt`` ((H, W) uint8 or None) and ``error`` (None, or why the image could not be
    read when ``skip_unreadable`` is set; ``image`` is then None).
    """

    def __init__(
        self,
        ids: Sequence[str],
        labels: Sequence[Sequence[int]],
        image_paths: Sequence[Path],
        gt_paths: Sequence[Optional[Path]],
        skip_unreadable: bool = False,
    ) -> None:
        self.ids, self.labels = list(ids), [list(x) for x in labels]
        self.image_paths, self.gt_paths = list(image_paths), list(gt_paths)
        self.skip_unreadable = skip_unreadable

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {"id": self.ids[i], "labels": self.labels[i], "image": None, "gt": None, "error": None}
        try:
            item["image"] = load_rgb(self.image_paths[i])
            if self.gt_paths[i] is not None:
                item["gt"] = load_mask(self.gt_paths[i])
        except (ImageReadError, FileNotFoundError) as err:
            if not self.skip_unreadable:
                raise
            item["image"], item["error"] = None, str(err)
        return item


def collate_items(items: list[dict]) -> list[dict]:
    """Images differ in size: a batch is the list of items."""
    return items


class VOCDataModule(L.LightningDataModule):
    """PASCAL VOC 2012 layout: ``JPEGImages/``, ``Annotations/*.xml``, ``ImageSets/Segmentation/<split>.txt``,
    ground truth in ``SegmentationClassAug/`` or ``SegmentationClass/`` where present.

    Args:
        root: the ``VOC2012`` folder (the one holding ``JPEGImages/``).
        split: the split the labeler's ``predict`` and ``validate`` run on (``train``, ``train_aug``, ``val``).
        class_names: the dataset's foreground class names as written in the XML files, in class-index order.
        batch_size: images per labeler call (same-size images share one forward/backward).
        num_workers: image decoding processes.
        skip_unreadable: skip (and count) images that are missing or cannot be decoded instead of
            stopping with an error that names the file.
    """

    def __init__(
        self,
        root: str,
        split: str = "train",
        class_names: Sequence[str] = VOC_CLASSES,
        batch_size: int = 8,
        num_workers: int = 4,
        skip_unreadable: bool = False,
    ) -> None:
        super().__init__()
        self.root = Path(root).expanduser()
        self.split = split
        self.class_names = list(class_names)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.skip_unreadable = skip_unreadable
        self.dataset: Optional[LabeledImages] = None

    @property
    def num_classes(self) -> int:
        """Classes including background (index 0)."""
        return 1 + len(self.class_names)

    def _check_root(self) -> None:
        if not (self.root / "JPEGImages").is_dir():
            raise FileNotFoundError(
                f"No JPEGImages/ folder under {self.root}. Set --data.root to the VOC2012 folder "
                "(the one holding JPEGImages/, Annotations/ and ImageSets/)."
            )

    def build_dataset(self, split: str) -> LabeledImages:
        """Read the split list and every annotation; images without labels are left out with a warning."""
        self._check_root()
        ids, labels, images, gts, unlabeled = [], [], [], [], []
        for image_id in read_split(self.root, split):
            lab = parse_labels(self.root / "Annotations" / f"{image_id}.xml", self.class_names)
            if not lab:
                unlabeled.append(image_id)
                continue
            ids.append(image_id)
            labels.append(lab)
            images.append(self.root / "JPEGImages" / f"{image_id}.jpg")
            gts.append(ground_truth_path(self.root, image_id))
        if unlabeled:
            warnings.warn(
                f"{len(unlabeled)} image(s) of split {split!r} have no labelled object and are skipped: "
                f"{', '.join(unlabeled[:5])}{' …' if len(unlabeled) > 5 else ''}",
                stacklevel=2,
            )
        return LabeledImages(ids, labels, images, gts, self.skip_unreadable)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.dataset is None:
            self.dataset = self.build_dataset(self.split)
        if stage in ("validate", "test") and not any(p is not None for p in self.dataset.gt_paths):
            raise FileNotFoundError(
                f"No ground-truth masks for split {self.split!r} under {self.root}/SegmentationClass(Aug)/; "
                "validate needs them. Use predict to only write pseudo-labels."
            )

    def _loader(self) -> DataLoader:
        assert self.dataset is not None, "call setup() first"
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate_items,
            persistent_workers=False,
        )

    def predict_dataloader(self) -> DataLoader:
        return self._loader()

    def val_dataloader(self) -> DataLoader:
        return self._loader()

    def test_dataloader(self) -> DataLoader:
        return self._loader()


class SyntheticVOCDataModule(VOCDataModule):
    """The embedded default: a small synthetic dataset in VOC layout that the package writes itself.

    Coloured rectangles and ellipses of a few VOC classes on smooth backgrounds, with XML labels and
    ground-truth masks; written once to ``root`` (rewritten if incomplete) by ``prepare_data``.

    Args:
        root: where to write it.
        num_train, num_val: images in the ``train`` and ``val`` splits.
        seed: the dataset's random seed.
        Other arguments as :class:`VOCDataModule`.
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
        super().__init__(root, split, VOC_CLASSES, batch_size, num_workers, skip_unreadable)
        self.synthetic = {"num_train": num_train, "num_val": num_val, "seed": seed}

    def prepare_data(self) -> None:
        ensure_synthetic_voc(self.root, **self.synthetic)
