"""The result of every dataset parser: the images of one split with their image-level labels.

Only the standard library is used, so this module imports without torch.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


@dataclass(frozen=True)
class LabeledSplit:
    """One split of a dataset, one entry per image in every per-image list.

    Attributes:
        ids: image ids (file stems), unique; outputs such as ``masks/<id>.png`` are named by them.
        labels: 0-based class indices of each image, in order of first appearance, no repeats.
            May be ``[]`` (an image without labelled objects): parsers keep such images, the
            DataModule warns and skips them.
        image_paths: the image files.
        gt_paths: ground-truth masks (0 = background, ``c + 1`` = class ``c``, 255 = ignore) or None.
        class_names: the dataset's class names; ``class_names[c]`` is class index ``c``.
        prompt_names: the text that goes into the CLIP prompt for each class, synonyms included
            (``"person with clothes,people,human"``); same length as ``class_names``.
    Raises:
        ValueError: lists of different lengths, duplicate ids, or a label outside ``0..len(class_names)-1``.
    """

    ids: list[str]
    labels: list[list[int]]
    image_paths: list[Path]
    gt_paths: list[Optional[Path]]
    class_names: list[str]
    prompt_names: list[str]

    def __post_init__(self) -> None:
        lengths = {len(self.ids), len(self.labels), len(self.image_paths), len(self.gt_paths)}
        if len(lengths) != 1:
            raise ValueError(
                f"LabeledSplit needs one entry per image in ids, labels, image_paths and gt_paths; got lengths "
                f"{len(self.ids)}, {len(self.labels)}, {len(self.image_paths)}, {len(self.gt_paths)}."
            )
        if len(self.class_names) != len(self.prompt_names):
            raise ValueError(
                f"{len(self.class_names)} class names but {len(self.prompt_names)} prompt names; "
                "give one prompt per class."
            )
        if len(set(self.ids)) != len(self.ids):
            dupes = sorted(i for i, n in Counter(self.ids).items() if n > 1)
            raise ValueError(f"Image ids must be unique (outputs are named by them); repeated: {dupes[:5]}.")
        num = len(self.class_names)
        for image_id, labels in zip(self.ids, self.labels):
            if any(not 0 <= c < num for c in labels):
                raise ValueError(f"Image {image_id!r} has labels {labels}; class indices must be in 0..{num - 1}.")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_classes(self) -> int:
        """Classes including background (mask value 0)."""
        return 1 + len(self.class_names)

    def unlabeled_ids(self) -> list[str]:
        """Ids of the images whose label list is empty."""
        return [i for i, labels in zip(self.ids, self.labels) if not labels]
