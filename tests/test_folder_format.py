"""Your-own-dataset layout: class lists, CSV/JSON label files, image discovery, masks, the worked example."""
from __future__ import annotations

import csv
import json
import warnings

import numpy as np
import pytest
from PIL import Image

from lightning_clipes.data.folder_format import read_class_list, read_folder_split, write_example_folder
from lightning_clipes.data.voc_format import load_mask, save_mask_png

CLASSES = ["cat", "dog", "forklift,lift truck"]


def make_images(folder, *names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("RGB", (8, 6), (200, 10, 10)).save(folder / name)
    return folder


def test_read_class_list_file_and_lines(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("# my classes\n\ncat\n  forklift , lift truck ,  \ndog  # a comment\n\n")
    assert read_class_list(path) == (["cat", "forklift", "dog"], ["cat", "forklift,lift truck", "dog"])
    assert read_class_list(str(path)) == read_class_list(["cat", "forklift, lift truck", "dog"])
    with pytest.raises(ValueError, match=r"\['cat'\]"):
        read_class_list(["cat", "dog", "cat,kitty"])
    with pytest.raises(ValueError, match="no class names"):
        read_class_list(["", "# nothing"])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty.txt"):
        read_class_list(empty)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_class_list(tmp_path / "missing.txt")


def test_csv_labels_keys_order_and_warnings(tmp_path):
    images = make_images(tmp_path / "images", "a.jpg", "B.PNG", "c.jpeg", "d.bmp", "e.jpg", "f.tif")
    (images / "notes.txt").write_text("not an image")
    labels = tmp_path / "labels.csv"
    labels.write_text("image,labels,comment\nc.jpeg, dog ; cat;dog,x\nB,forklift\na.jpg,\ngone.jpg,cat\n"
                      "d,cat\nd.bmp,dog\ne.jpg,\n")
    with pytest.warns(UserWarning) as record:
        split = read_folder_split(images, labels, CLASSES)
    messages = [str(w.message) for w in record]
    assert any("1 image(s) listed" in m and "gone.jpg" in m for m in messages)
    assert any("1 image file(s)" in m and "f.tif" in m for m in messages)
    assert not any("notes.txt" in m for m in messages)
    assert split.ids == ["B", "a", "c", "d", "e"]  # file-name order (upper case first), f unlisted
    assert split.labels == [[2], [], [1, 0], [0, 1], []]  # rows of one image merge in order
    assert split.image_paths[0] == images / "B.PNG" and split.gt_paths == [None] * 5
    assert split.class_names == ["cat", "dog", "forklift"] and split.prompt_names[2] == "forklift,lift truck"


def test_json_forms_match_csv(tmp_path):
    images = make_images(tmp_path / "images", "x.jpg", "y.png")
    as_csv = tmp_path / "labels.csv"
    as_csv.write_text("image,labels\nx.jpg,dog;cat\ny,\n")
    as_dict = tmp_path / "dict.json"
    as_dict.write_text(json.dumps({"x.jpg": ["dog", "cat"], "y": []}))
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps([{"image": "x", "labels": ["dog", 0]}, {"image": "y.png", "labels": []}]))
    results = [read_folder_split(images, f, CLASSES) for f in (as_csv, as_dict, as_list)]
    assert results[0].labels == [[1, 0], []] and results[1] == results[0] and results[2] == results[0]


def test_unknown_class_error_and_warn(tmp_path):
    images = make_images(tmp_path / "images", "x.jpg", "y.jpg")
    labels = tmp_path / "labels.csv"
    labels.write_text("image,labels\nx.jpg,cat\ny.jpg,Dog;dog\n")
    with pytest.raises(ValueError, match="'Dog'") as err:  # case-sensitive
        read_folder_split(images, labels, CLASSES)
    assert str(labels) in str(err.value) and "'y.jpg'" in str(err.value) and "'forklift'" in str(err.value)
    with pytest.warns(UserWarning, match="'Dog'"):
        split = read_folder_split(images, labels, CLASSES, unknown="warn")
    assert split.labels == [[0], [1]]
    with pytest.raises(ValueError, match="'error' or 'warn'"):
        read_folder_split(images, labels, CLASSES, unknown="ignore")


def test_bad_inputs(tmp_path):
    images = make_images(tmp_path / "images", "x.jpg")
    good = tmp_path / "labels.csv"
    good.write_text("image,labels\nx.jpg,cat\n")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_folder_split(tmp_path / "nowhere", good, CLASSES)
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        read_folder_split(images, tmp_path / "missing.csv", CLASSES)
    with pytest.raises(FileNotFoundError, match="no_masks"):
        read_folder_split(images, good, CLASSES, mask_dir=tmp_path / "no_masks")
    header = tmp_path / "header.csv"
    header.write_text("file,classes\nx.jpg,cat\n")
    with pytest.raises(ValueError, match="image,labels"):
        read_folder_split(images, header, CLASSES)
    yaml = tmp_path / "labels.yaml"
    yaml.write_text("x.jpg: [cat]\n")
    with pytest.raises(ValueError, match=".yaml"):
        read_folder_split(images, yaml, CLASSES)
    broken = tmp_path / "broken.json"
    broken.write_text('{"x.jpg": ["cat"')
    with pytest.raises(ValueError, match="not valid JSON"):
        read_folder_split(images, broken, CLASSES)
    make_images(images, "x.png")
    with pytest.raises(ValueError, match="share a file stem"):
        read_folder_split(images, good, CLASSES)


def test_masks_are_found_by_stem(tmp_path):
    images = make_images(tmp_path / "images", "x.jpg", "y.jpg")
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"x.jpg": ["cat"], "y.jpg": ["dog"]}))
    masks = tmp_path / "masks"
    masks.mkdir()
    save_mask_png(masks / "y.png", np.full((6, 8), 2, np.uint8))
    split = read_folder_split(images, labels, CLASSES, mask_dir=masks)
    assert split.gt_paths == [None, masks / "y.png"]


def test_worked_example(tmp_path):
    image_dir, label_file, class_file = write_example_folder(tmp_path / "example")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the example parses without a single warning
        split = read_folder_split(image_dir, label_file, class_file, mask_dir=tmp_path / "example" / "masks")
    names, prompts = read_class_list(class_file)
    assert any("," in p for p in prompts) and split.prompt_names == prompts
    with label_file.open(newline="") as f:
        rows = {row["image"]: row["labels"].split(";") for row in csv.DictReader(f)}
    assert len(split) == len(rows) >= 4
    for image_id, labels, gt in zip(split.ids, split.labels, split.gt_paths):
        assert [names[c] for c in labels] == rows[f"{image_id}.jpg"]
        assert set(np.unique(load_mask(gt))) - {0} == {1 + c for c in labels}  # mask value = 1 + label index


def test_files_in_another_encoding_name_the_file_and_the_fix(tmp_path):
    from lightning_clipes.data.folder_format import read_label_file
    from lightning_clipes.data.voc_format import read_split

    split = tmp_path / "VOC2012" / "ImageSets" / "Segmentation"
    split.mkdir(parents=True)
    (split / "train.txt").write_bytes("2007_000032\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"Split file .*train\.txt is not UTF-8 text.*iconv"):
        read_split(tmp_path / "VOC2012", "train")
    labels = tmp_path / "labels.csv"
    labels.write_bytes("image,labels\nb\xe9b\xe9.jpg,cat\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"Label file .*labels\.csv is not UTF-8 text"):
        read_label_file(labels)
    classes = tmp_path / "classes.txt"
    classes.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"Class list .*classes\.txt is not UTF-8 text"):
        read_class_list(classes)


def test_unknown_labels_can_be_dropped_from_the_command_line(tmp_path):
    """The error's advice is a flag the CLI accepts (FolderSource.unknown), not a Python keyword."""
    from lightning_clipes.data.sources import FolderSource

    images, labels, classes = write_example_folder(tmp_path / "ex")
    rows = labels.read_text().splitlines()
    labels.write_text("\n".join([rows[0], rows[1] + ";unicorn", *rows[2:]]) + "\n")
    with pytest.raises(ValueError, match=r"unicorn.*--data\.source\.unknown warn"):
        FolderSource(str(images), str(labels), str(classes)).read("train")
    with pytest.warns(UserWarning, match="unicorn"):
        FolderSource(str(images), str(labels), str(classes), unknown="warn").read("train")
