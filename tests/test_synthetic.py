"""The synthetic VOC-layout dataset: complete, self-consistent, deterministic, resumable."""
from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image

from lightning_clipes.data.synthetic import class_colour, ensure_synthetic_voc, write_synthetic_voc
from lightning_clipes.data.voc_format import VOC_CLASSES, load_mask, load_rgb, parse_labels, read_split

CLASSES = ("aeroplane", "bicycle", "bird")


def all_ids(root):
    return read_split(root, "train") + read_split(root, "val")


def snapshot(root):
    """Bytes of every mask and annotation, by relative path."""
    files = sorted((root / "SegmentationClass").glob("*.png")) + sorted((root / "Annotations").glob("*.xml"))
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in files}


def test_layout_and_files_for_every_id(tmp_path):
    start = time.perf_counter()
    root = write_synthetic_voc(tmp_path / "VOC2012", num_train=5, num_val=3, seed=1)
    assert time.perf_counter() - start < 5  # typically ~0.02 s; loose bound for slow CI machines
    assert root == tmp_path / "VOC2012"
    assert read_split(root, "train") == [f"synth_{i:06d}" for i in range(5)]
    assert read_split(root, "val") == [f"synth_{i:06d}" for i in range(5, 8)]
    for image_id in all_ids(root):
        for rel in (f"JPEGImages/{image_id}.jpg", f"Annotations/{image_id}.xml", f"SegmentationClass/{image_id}.png"):
            assert (root / rel).is_file(), rel
    marker = json.loads((root / ".synthetic_complete").read_text())
    assert marker["num_train"] == 5 and marker["num_val"] == 3 and marker["seed"] == 1


def test_annotations_match_images_and_masks(tmp_path):
    sizes = ((64, 48), (80, 64), (33, 50))
    root = write_synthetic_voc(tmp_path / "v", num_train=12, num_val=6, image_sizes=sizes, max_objects=3, seed=3)
    counts = []
    for i, image_id in enumerate(all_ids(root)):
        xml = ET.parse(root / "Annotations" / f"{image_id}.xml").getroot()
        width, height = int(xml.findtext("size/width")), int(xml.findtext("size/height"))
        assert (width, height) == sizes[i % len(sizes)] and xml.findtext("size/depth") == "3"
        assert Image.open(root / "JPEGImages" / f"{image_id}.jpg").size == (width, height)
        assert xml.findtext("filename") == f"{image_id}.jpg"
        mask = load_mask(root / "SegmentationClass" / f"{image_id}.png")
        assert mask.shape == (height, width) and Image.open(root / "SegmentationClass" / f"{image_id}.png").mode == "P"
        assert set(np.unique(mask)) <= {0} | {VOC_CLASSES.index(c) + 1 for c in CLASSES}
        labels = parse_labels(root / "Annotations" / f"{image_id}.xml", VOC_CLASSES)
        assert labels and set(labels) == {int(v) - 1 for v in np.unique(mask) if v != 0}
        objects = xml.findall("object")
        counts.append(len(objects))
        for obj in objects:  # 1-based inclusive boxes inside the image, covering pixels of that class
            x0, y0, x1, y1 = (int(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax"))
            assert 1 <= x0 <= x1 <= width and 1 <= y0 <= y1 <= height
            value = VOC_CLASSES.index(obj.findtext("name")) + 1
            assert (mask[y0 - 1:y1, x0 - 1:x1] == value).any()
        fraction = (mask > 0).mean()
        assert 0.03 < fraction < 0.9
    assert min(counts) >= 1 and max(counts) > 1


def test_each_class_has_its_own_colour_in_the_image(tmp_path):
    root = write_synthetic_voc(tmp_path / "v", num_train=6, num_val=0, seed=5)
    for image_id in all_ids(root):
        image = load_rgb(root / "JPEGImages" / f"{image_id}.jpg").astype(np.float64)
        mask = load_mask(root / "SegmentationClass" / f"{image_id}.png")
        for value in set(np.unique(mask)) - {0}:
            mean = image[mask == value].mean(axis=0)
            assert np.abs(mean - class_colour(int(value) - 1)).max() < 40  # JPEG blurs the edges a little
    colours = {class_colour(i) for i in range(len(VOC_CLASSES))}
    assert len(colours) == len(VOC_CLASSES)


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = snapshot(write_synthetic_voc(tmp_path / "a", num_train=4, num_val=2, seed=7))
    b = snapshot(write_synthetic_voc(tmp_path / "b", num_train=4, num_val=2, seed=7))
    c = snapshot(write_synthetic_voc(tmp_path / "c", num_train=4, num_val=2, seed=8))
    assert a == b
    assert a.keys() == c.keys() and a != c


def test_invalid_parameters(tmp_path):
    with pytest.raises(ValueError, match="unicorn"):
        write_synthetic_voc(tmp_path / "v", classes=("aeroplane", "unicorn"))
    with pytest.raises(ValueError):
        write_synthetic_voc(tmp_path / "v", classes="aeroplane")
    with pytest.raises(ValueError):
        write_synthetic_voc(tmp_path / "v", image_sizes=())
    with pytest.raises(TypeError, match="num_images"):
        ensure_synthetic_voc(tmp_path / "v", num_images=3)


def test_refuses_to_overwrite_a_real_dataset(tmp_path):
    (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "JPEGImages" / "2007_000032.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="2007_000032.jpg"):
        write_synthetic_voc(tmp_path)
    assert not (tmp_path / "ImageSets").exists()


def test_rewrite_removes_ids_of_a_larger_earlier_dataset(tmp_path):
    root = write_synthetic_voc(tmp_path / "v", num_train=4, num_val=2)
    write_synthetic_voc(root, num_train=2, num_val=1)
    assert sorted(p.stem for p in (root / "JPEGImages").iterdir()) == all_ids(root)
    assert len(all_ids(root)) == 3


def test_ensure_skips_a_complete_dataset_and_rewrites_otherwise(tmp_path):
    """Only the marker is consulted: with a matching marker, a deleted image is NOT recreated."""
    root = tmp_path / "v"
    ensure_synthetic_voc(root, num_train=3, num_val=1, seed=2)
    first = root / "JPEGImages" / "synth_000000.jpg"
    first.unlink()
    assert ensure_synthetic_voc(root, num_train=3, num_val=1, seed=2) == root
    assert not first.exists()  # marker says complete with these parameters: nothing touched

    (root / ".synthetic_complete").unlink()  # as after a process killed mid-write
    ensure_synthetic_voc(root, num_train=3, num_val=1, seed=2)
    assert first.exists() and (root / ".synthetic_complete").is_file()

    (root / ".synthetic_complete").write_text("{trunc")  # a damaged marker counts as missing
    first.unlink()
    ensure_synthetic_voc(root, num_train=3, num_val=1, seed=2)
    assert first.exists()

    ensure_synthetic_voc(root, num_train=3, num_val=1, seed=9)  # other parameters: rewritten
    assert json.loads((root / ".synthetic_complete").read_text())["seed"] == 9
    assert snapshot(root) == snapshot(write_synthetic_voc(tmp_path / "w", num_train=3, num_val=1, seed=9))


def _ensure_and_log(root, log):
    """In a child process: ensure the dataset, noting in ``log`` each time it is really written."""
    import lightning_clipes.data.synthetic as synthetic

    import functools

    original = synthetic.write_synthetic_voc

    @functools.wraps(original)
    def write(*args, **kwargs):
        with open(log, "a") as f:
            f.write("written\n")
        return original(*args, **kwargs)

    synthetic.write_synthetic_voc = write
    synthetic.ensure_synthetic_voc(root, num_train=24, num_val=8)


def test_jobs_that_start_together_on_one_root_write_it_once(tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    log = tmp_path / "writes.log"
    procs = [ctx.Process(target=_ensure_and_log, args=(tmp_path / "VOC2012", log)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert log.read_text() == "written\n"
    assert len(read_split(tmp_path / "VOC2012", "train")) == 24
