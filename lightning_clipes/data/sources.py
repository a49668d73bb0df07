"""Image sources: where a dataset's images, image-level labels and ground truth come from.

A source turns a split name into a :class:`~lightning_clipes.data.labeled_split.LabeledSplit`. The
DataModules take any source, so VOC, COCO and your own folder go through the same labeler, store,
student and CLI (``data.init_args.source: {class_path: lightning_clipes.COCOSource, …}``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Sequence, Union

from lightning_clipes.data.labeled_split import LabeledSplit
from lightning_clipes.data.synthetic import ensure_synthetic_voc
from lightning_clipes.data.voc_format import VOC_CLASSES, ground_truth_path, parse_labels, read_split


class ImageSource:
    """Base class. Subclasses set ``class_names`` and ``prompt_names`` and implement :meth:`read`."""

    class_names: list[str]
    prompt_names: list[str]

    def read(self, split: str) -> LabeledSplit:
        raise NotImplementedError

    def prepare(self) -> None:
        """Download or write data (rank 0 only, before ``read``); nothing by default."""

    def check(self, split: str) -> None:
        """Cheap checks that ``split`` can be read (folders and files exist), before anything heavy starts;
        raises FileNotFoundError or ValueError saying what is missing and which option to set."""


class VOCSource(ImageSource):
    """PASCAL VOC 2012 layout: ``JPEGImages/``, ``Annotations/*.xml`` (every object is a label),
    ``ImageSets/Segmentation/<split>.txt``, ground truth in ``SegmentationClassAug/`` or ``SegmentationClass/``.

    Args:
        root: the ``VOC2012`` folder.
        class_names: the class names used in the XML files, in class-index order.
    """

    def __init__(self, root: Union[str, Path], class_names: Sequence[str] = VOC_CLASSES) -> None:
        from lightning_clipes.components.prompts import VOC_PROMPT_NAMES

        self.root = Path(root).expanduser()
        self.class_names = list(class_names)
        same = self.class_names == list(VOC_CLASSES)
        self.prompt_names = list(VOC_PROMPT_NAMES) if same else list(self.class_names)

    def check(self, split: str) -> None:
        if not (self.root / "JPEGImages").is_dir():
            raise FileNotFoundError(
                f"No JPEGImages/ folder under {self.root}. Set --data.root to the VOC2012 folder "
                "(the one holding JPEGImages/, Annotations/ and ImageSets/)."
            )
        read_split(self.root, split)

    def read(self, split: str) -> LabeledSplit:
        self.check(split)
        ids = read_split(self.root, split)
        return LabeledSplit(
            ids=ids,
            labels=[parse_labels(self.root / "Annotations" / f"{i}.xml", self.class_names) for i in ids],
            image_paths=[self.root / "JPEGImages" / f"{i}.jpg" for i in ids],
            gt_paths=[ground_truth_path(self.root, i) for i in ids],
            class_names=self.class_names,
            prompt_names=self.prompt_names,
        )


class SyntheticVOCSource(VOCSource):
    """The package's own synthetic dataset in VOC layout (``train`` and ``val``), written by :meth:`prepare`."""

    def __init__(self, root: Union[str, Path] = "outputs/synthetic/VOC2012", num_train: int = 16,
                 num_val: int = 8, seed: int = 0) -> None:
        super().__init__(root)
        self.synthetic = {"num_train": num_train, "num_val": num_val, "seed": seed}

    def prepare(self) -> None:
        ensure_synthetic_voc(self.root, **self.synthetic)

    def check(self, split: str) -> None:
        """Written by :meth:`prepare` on first use: nothing to check."""


class COCOSource(ImageSource):
    """COCO 2014: ``train2014/``, ``val2014/``, labels from ``annotations/instances_<split>.json`` (or a
    label file), ground truth PNGs in ``SegmentationClass/<split>/`` where present; 80 classes,
    1…80 in masks with 0 = background.

    Args:
        root: the folder holding ``train2014/``, ``val2014/`` and ``annotations/``.
        annotation_file: instances json to use instead of the split's default.
        label_file: image-level labels (JSON or CSV) instead of the instances json.
    """

    def __init__(self, root: Union[str, Path], annotation_file: Optional[str] = None,
                 label_file: Optional[str] = None) -> None:
        from lightning_clipes.components.prompts import COCO_PROMPT_NAMES
        from lightning_clipes.data.coco_format import COCO_CLASSES

        self.root = Path(root).expanduser()
        self.annotation_file, self.label_file = annotation_file, label_file
        self.class_names, self.prompt_names = list(COCO_CLASSES), list(COCO_PROMPT_NAMES)

    def check(self, split: str) -> None:
        from lightning_clipes.data.coco_format import SPLIT_ALIASES

        split = SPLIT_ALIASES.get(split, split)
        if not (self.root / split).is_dir():
            raise FileNotFoundError(f"No image folder {self.root / split}: set --data.source.root to the COCO folder that "
                                    "holds train2014/, val2014/ and annotations/ (splits: train2014, val2014).")
        labels = self.label_file or self.annotation_file or self.root / "annotations" / f"instances_{split}.json"
        if not Path(str(labels).replace("{split}", split)).expanduser().is_file():
            raise FileNotFoundError(f"Labels {labels} not found: put COCO's instances_{split}.json under "
                                    f"{self.root / 'annotations'}, or set --data.source.annotation_file / label_file.")

    def read(self, split: str) -> LabeledSplit:
        from lightning_clipes.data.coco_format import read_coco_split

        return read_coco_split(self.root, split, annotation_file=self.annotation_file, label_file=self.label_file)


class FolderSource(ImageSource):
    """Your own data: images in a folder, image-level labels in a CSV or JSON file, a class list.

    Args:
        image_dir: the images (a split name picks a subfolder when one exists: ``image_dir/<split>/``).
        label_file: CSV (``image,labels`` with ``;`` between names) or JSON (``{"a.jpg": ["cat"]}``);
            ``{split}`` in the path is replaced by the split name.
        classes: a text file (one class per line, synonyms after commas: ``forklift,lift truck``) or a list.
        mask_dir: optional ground truth ``<stem>.png`` (class index + 1, 0 = background, 255 = ignore);
            ``{split}`` is replaced too.
        unknown: a label that is no class stops with an error naming it (``error``), or is dropped with a
            warning (``warn``).
    """

    def __init__(self, image_dir: str, label_file: str, classes: Union[str, list[str]],
                 mask_dir: Optional[str] = None, unknown: Literal["error", "warn"] = "error") -> None:
        from lightning_clipes.data.folder_format import read_class_list

        self.image_dir, self.label_file, self.mask_dir, self.unknown = image_dir, label_file, mask_dir, unknown
        self.classes = classes
        self.class_names, self.prompt_names = read_class_list(classes)

    def check(self, split: str) -> None:
        image_dir = Path(self.image_dir.replace("{split}", split)).expanduser()
        label_file = Path(self.label_file.replace("{split}", split)).expanduser()
        if not image_dir.is_dir():
            raise FileNotFoundError(f"Image folder {image_dir} not found (split {split!r}): set --data.source.image_dir.")
        if not label_file.is_file():
            raise FileNotFoundError(f"Label file {label_file} not found (split {split!r}): set --data.source.label_file "
                                    "to a CSV (image,labels) or JSON file.")
        if self.mask_dir and not Path(self.mask_dir.replace("{split}", split)).expanduser().is_dir():
            raise FileNotFoundError(f"Mask folder {self.mask_dir.replace('{split}', split)} not found (split {split!r}): "
                                    "set --data.source.mask_dir, or null without ground truth.")

    def read(self, split: str) -> LabeledSplit:
        from lightning_clipes.data.folder_format import read_folder_split

        image_dir = Path(self.image_dir.replace("{split}", split)).expanduser()
        if (image_dir / split).is_dir():
            image_dir = image_dir / split
        mask_dir = Path(self.mask_dir.replace("{split}", split)).expanduser() if self.mask_dir else None
        return read_folder_split(image_dir, Path(self.label_file.replace("{split}", split)).expanduser(),
                                 self.classes, mask_dir=mask_dir, unknown=self.unknown)
