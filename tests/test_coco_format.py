"""COCO 2014 layout against hand-written instances json, label files and the synthetic COCO folder."""
from __future__ import annotations

import json
import random
import warnings

import numpy as np
import pytest
from PIL import Image

from lightning_clipes.data.coco_format import COCO_CLASSES, read_coco_split, write_synthetic_coco
from lightning_clipes.data.voc_format import load_mask, load_rgb, save_mask_png

# The official category ids, written out independently: 1..90 without these ten.
OFFICIAL_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


def make_coco(root, anns, images=("a", "b", "c", "d"), on_disk=("a", "b", "c", "e"), split="train2014"):
    """Images ``COCO_<split>_<name>.jpg`` (``on_disk``), an instances json listing ``images`` with ids 1, 2, ...
    and annotations ``(image name, category id, iscrowd)``; categories shuffled to test the id sort."""
    (root / split).mkdir(parents=True)
    (root / "annotations").mkdir()
    for name in on_disk:
        Image.new("RGB", (8, 6), (10, 20, 30)).save(root / split / f"COCO_{split}_{name}.jpg")
    ids = {name: k + 1 for k, name in enumerate(images)}
    cats = [{"id": i, "name": n} for i, n in zip(OFFICIAL_IDS, COCO_CLASSES)]
    random.Random(0).shuffle(cats)
    data = {
        "images": [{"id": ids[n], "file_name": f"COCO_{split}_{n}.jpg"} for n in images],
        "annotations": [{"id": 100 + k, "image_id": ids[n], "category_id": c, "iscrowd": crowd}
                        for k, (n, c, crowd) in enumerate(anns)],
        "categories": cats,
    }
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return root


def test_class_list_matches_official_ids():
    assert len(COCO_CLASSES) == 80 == len(set(COCO_CLASSES))
    by_id = dict(zip(OFFICIAL_IDS, COCO_CLASSES))
    assert by_id[1] == "person" and by_id[3] == "car" and by_id[4] == "motorcycle" and by_id[18] == "dog"
    assert by_id[27] == "backpack" and by_id[46] == "wine glass" and by_id[67] == "dining table"
    assert by_id[84] == "book" and by_id[90] == "toothbrush"


def test_labels_from_instances_json(tmp_path):
    anns = [("a", 90, 0), ("b", 3, 1), ("a", 1, 0), ("a", 3, 1), ("a", 90, 0), ("d", 2, 0), ("a", 1, 0)]
    root = make_coco(tmp_path, anns)
    with pytest.warns(UserWarning) as record:
        split = read_coco_split(root, "train2014", prompt_names=[f"p{i}" for i in range(80)])
    messages = [str(w.message) for w in record]
    assert any("1 image(s) listed" in m and "COCO_train2014_d.jpg" in m for m in messages)
    assert any("1 image file(s)" in m and "COCO_train2014_e.jpg" in m for m in messages)
    assert split.ids == ["COCO_train2014_a", "COCO_train2014_b", "COCO_train2014_c"]
    # ids 90, 1, 3 -> 79, 0, 2 in order of first appearance; iscrowd counts; no annotations -> []
    assert split.labels == [[79, 0, 2], [2], []]
    assert split.image_paths[1] == root / "train2014" / "COCO_train2014_b.jpg"
    assert split.gt_paths == [None, None, None]
    assert split.class_names == list(COCO_CLASSES) and split.prompt_names[79] == "p79"
    assert split.unlabeled_ids() == ["COCO_train2014_c"] and split.num_classes == 81


def test_default_prompts_are_clip_es_names(tmp_path):
    from lightning_clipes.components.prompts import COCO_PROMPT_NAMES

    root = make_coco(tmp_path, [("a", 1, 0)], images=("a",), on_disk=("a",))
    split = read_coco_split(root, "train")
    assert split.prompt_names == list(COCO_PROMPT_NAMES)
    assert split.prompt_names[0] == "person with clothes,people,human" and split.prompt_names[3] == "motorbike"


def test_split_aliases_and_ground_truth_discovery(tmp_path):
    root = make_coco(tmp_path, [("a", 1, 0), ("b", 2, 0)], images=("a", "b", "c"), on_disk=("a", "b", "c"),
                     split="val2014")
    flat, nested = root / "SegmentationClass", root / "SegmentationClass" / "val2014"
    nested.mkdir(parents=True)
    for path in (flat / "COCO_val2014_a.png", flat / "COCO_val2014_b.png", nested / "COCO_val2014_b.png"):
        save_mask_png(path, np.zeros((6, 8), np.uint8))
    split = read_coco_split(root, "val")
    assert split == read_coco_split(root, "val2014")
    assert split.gt_paths == [flat / "COCO_val2014_a.png", nested / "COCO_val2014_b.png", None]


def test_label_file_variants(tmp_path):
    root = tmp_path / "coco"
    (root / "train2014").mkdir(parents=True)
    for i in (9, 25, 30):
        Image.new("RGB", (8, 6)).save(root / "train2014" / f"COCO_train2014_{i:012d}.jpg")
    as_json = tmp_path / "labels.json"
    as_json.write_text(json.dumps({"9": ["dog", "person"], "COCO_train2014_000000000025.jpg": [79, "car"],
                                   "COCO_train2014_000000000030": []}))
    as_csv = tmp_path / "labels.csv"
    as_csv.write_text("image,labels\n000000000009,dog;person;dog\n25,toothbrush; car\n"
                      "COCO_train2014_000000000030.jpg,\n")
    expected = [[16, 0], [79, 2], []]
    assert read_coco_split(root, "train", label_file=as_json).labels == expected
    assert read_coco_split(root, "train", label_file=as_csv).labels == expected

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"9": ["dog", "motorbike"]}))
    with pytest.raises(ValueError, match="motorbike") as err:
        read_coco_split(root, "train", label_file=bad)
    assert str(bad) in str(err.value) and "'9'" in str(err.value) and "motorcycle" in str(err.value)
    with pytest.warns(UserWarning) as record:
        split = read_coco_split(root, "train", label_file=bad, unknown="warn")
    messages = [str(w.message) for w in record]
    assert any("'motorbike'" in m and "dropped" in m for m in messages)
    assert any("2 image file(s)" in m and "COCO_train2014_000000000025.jpg" in m for m in messages)
    assert split.ids == ["COCO_train2014_000000000009"] and split.labels == [[16]]


def test_missing_files_and_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="train2014/ and val2014/"):
        read_coco_split(tmp_path, "train")
    (tmp_path / "train2014").mkdir()
    with pytest.raises(FileNotFoundError, match="annotation_file") as err:
        read_coco_split(tmp_path, "train")
    assert str(tmp_path / "annotations" / "instances_train2014.json") in str(err.value)
    assert "label_file" in str(err.value)
    with pytest.raises(ValueError, match="not both"):
        read_coco_split(tmp_path, "train", annotation_file="x.json", label_file="y.csv")
    root = make_coco(tmp_path / "c", [("a", 12, 0)], images=("a",), on_disk=("a",))  # 12 is no COCO id
    with pytest.raises(ValueError, match="category 12"):
        read_coco_split(root, "train")


def test_synthetic_coco_masks_match_labels(tmp_path):
    root = write_synthetic_coco(tmp_path / "coco", num_train=6, num_val=3, seed=1)
    seen = set()
    for split_name, count in (("train", 6), ("val", 3)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a clean dataset: no missing or unlisted images
            split = read_coco_split(root, split_name, prompt_names=COCO_CLASSES)
        data = json.loads((root / "annotations" / f"instances_{split_name}2014.json").read_text())
        assert len(split) == count and [c["id"] for c in data["categories"]] == OFFICIAL_IDS
        for image_id, labels, image_path, gt_path in zip(split.ids, split.labels, split.image_paths, split.gt_paths):
            mask = load_mask(gt_path)
            assert load_rgb(image_path).shape[:2] == mask.shape
            assert set(np.unique(mask)) - {0} == {1 + c for c in labels}  # mask value = 1 + label index
            seen.update(labels)
    assert seen <= {0, 2, 16, 79} and len(seen) >= 2
    again = write_synthetic_coco(root, num_train=2, num_val=1, seed=1)  # rewriting removes the leftovers
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(read_coco_split(again, "train", prompt_names=COCO_CLASSES)) == 2


def test_synthetic_coco_refuses_real_folder(tmp_path):
    (tmp_path / "train2014").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "train2014" / "COCO_train2014_000000000009.jpg")
    with pytest.raises(ValueError, match="did not write"):
        write_synthetic_coco(tmp_path)
    assert (tmp_path / "train2014" / "COCO_train2014_000000000009.jpg").is_file()
