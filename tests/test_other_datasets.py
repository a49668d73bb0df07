"""COCO-format and folder-format data through the labeler, the store and the student (issue #4)."""
from pathlib import Path

import numpy as np
import pytest

from lightning_clipes.cli import cli_main
from lightning_clipes.data.coco_format import read_coco_split, write_synthetic_coco
from lightning_clipes.data.folder_format import write_example_folder
from lightning_clipes.data.labeler_datamodule import LabelerDataModule
from lightning_clipes.data.sources import FolderSource
from lightning_clipes.data.voc_format import load_mask

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def test_coco_pseudo_labels_use_the_dataset_class_indices(tmp_path, tiny_openai_ckpt):
    root = write_synthetic_coco(tmp_path / "coco", num_train=4, num_val=2)
    out = tmp_path / "out"
    cli = cli_main(["validate", "-c", str(EXPERIMENTS / "coco_pseudo_labels.yaml"), "--data.source.root", str(root),
                    "--data.split", "val2014", "--model.pretrained", str(tiny_openai_ckpt), "--model.affinity_layers", "2",
                    "--data.num_workers", "0", "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(out)])
    assert cli.model.clipes.box_threshold == 0.7 and len(cli.model.class_names) == 80
    from lightning_clipes.data.coco_format import COCO_CLASSES

    names = {k.split("/")[-1] for k in cli.trainer.callback_metrics if k.startswith("pseudo/IoU/")}
    assert "pseudo/mIoU" in cli.trainer.callback_metrics and names and names <= {"background", *COCO_CLASSES}
    cli_main(["predict", "-c", str(EXPERIMENTS / "coco_pseudo_labels.yaml"), "--data.source.root", str(root),
              "--model.pretrained", str(tiny_openai_ckpt), "--model.affinity_layers", "2", "--data.num_workers", "0",
              "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(out)])
    split = read_coco_split(root, "train2014")
    store = out / "pseudo_labels"
    assert not (store / "cams").exists()  # COCO keeps masks and confidence only
    for image_id, labels, gt_path in zip(split.ids, split.labels, split.gt_paths):
        mask = load_mask(store / "masks" / f"{image_id}.png")
        gt = load_mask(gt_path)
        allowed = {0, *(k + 1 for k in labels)}
        assert set(np.unique(mask)) <= allowed  # labeler class k is mask value k + 1 ...
        assert set(np.unique(gt)) - {0, 255} == allowed - {0}  # ... exactly as in the ground truth


def test_folder_dataset_labels_and_bad_inputs(tmp_path):
    images, labels, classes = write_example_folder(tmp_path / "site")
    source = FolderSource(str(images), str(labels), str(classes), mask_dir=str(tmp_path / "site" / "masks"))
    assert source.prompt_names[0] == "forklift,lift truck" and source.class_names[0] == "forklift"
    data = source.read("train")
    for lab, gt_path in zip(data.labels, data.gt_paths):
        assert set(np.unique(load_mask(gt_path))) - {0, 255} == {k + 1 for k in lab}
    # one image with an empty label list, one listed but missing, one unlisted file
    rows = labels.read_text().splitlines()
    first = rows[1].split(",")[0]
    rows[1] = f"{first},"
    rows.append("ghost.jpg,pallet")
    labels.write_text("\n".join(rows) + "\n")
    (images / "stray.jpg").write_bytes((images / first).read_bytes() if (images / first).exists() else b"")
    dm = LabelerDataModule(source, split="train", num_workers=0)
    with pytest.warns(UserWarning) as record:
        dm.setup("predict")
    text = " ".join(str(w.message) for w in record)
    assert "ghost" in text and "stray" in text and "no labelled object" in text
    assert len(dm.dataset) == len(data.ids) - 1
    labels.write_text("image,labels\n" + f"{first},unicorn\n")
    with pytest.raises(ValueError, match="unicorn"):
        source.read("train")
    classes.write_text("pallet\npallet\n")
    with pytest.raises(ValueError, match="pallet"):
        FolderSource(str(images), str(labels), str(classes))


def test_open_vocabulary_needs_no_retraining(tmp_path, tiny_openai_ckpt):
    """New class names are just text: the labeler takes the folder's class file as its vocabulary."""
    from lightning_clipes.labeler import CLIPESLabeler

    _, _, classes = write_example_folder(tmp_path / "site")
    labeler = CLIPESLabeler(model_name="ViT-B-16", pretrained=str(tiny_openai_ckpt), class_names=str(classes),
                            background=["floor", "wall"])
    assert labeler.class_names == ["forklift,lift truck", "pallet", "traffic cone,safety cone"]
    assert labeler.clipes.fg_text.shape[0] == 3 and labeler.clipes.bg_text.shape[0] == 2
