"""The toy world: deterministic, self-consistent VOC layout, occlusion rule, splits, co-occurrence, safety."""
from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET
from collections import Counter

import numpy as np
import pytest

from lightning_clipes.data.toy_scenes import (
    HOME_BACKGROUND, MIN_VISIBLE, P_HOME, TOY_BACKGROUNDS, TOY_CLASSES, render_scene,
)
from lightning_clipes.data.toy_world import ToyWorldSource, ensure_toy_world, write_toy_world
from lightning_clipes.data.voc_format import load_mask, load_rgb, parse_labels, read_split
from lightning_clipes.data.toy_captions import FIRST_CLIP_INDEX, FIRST_VAL_INDEX


def snapshot(root):
    files = sorted((root / "SegmentationClass").glob("*.png")) + sorted((root / "Annotations").glob("*.xml"))
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in files}


@pytest.fixture(scope="module")
def scenes():
    return [render_scene(0, i, 96) for i in range(400)]


def test_layout_splits_and_speed(tmp_path):
    start = time.perf_counter()
    root = write_toy_world(tmp_path / "VOC2012", num_train=40, num_val=10, num_test=10, image_size=96, seed=1)
    assert time.perf_counter() - start < 10  # ~0.2 s here (3,000 images of 128 px: ~10 s)
    splits = {s: read_split(root, s) for s in ("train", "val", "test")}
    assert [len(v) for v in splits.values()] == [40, 10, 10]
    assert len(set().union(*splits.values())) == 60  # disjoint
    assert splits["train"][0] == "toy_000000" and splits["test"][-1] == "toy_000059"
    for image_id in splits["val"]:
        for rel in (f"JPEGImages/{image_id}.jpg", f"Annotations/{image_id}.xml", f"SegmentationClass/{image_id}.png"):
            assert (root / rel).is_file(), rel
    assert json.loads((root / ".toy_world_complete").read_text())["num_test"] == 10
    # the CLIP's training and validation scenes are other indices of the same world
    assert 60 < FIRST_CLIP_INDEX < FIRST_VAL_INDEX


def test_same_seed_same_bytes_other_seed_other_world(tmp_path):
    a = snapshot(write_toy_world(tmp_path / "a", 8, 2, 2, image_size=64, seed=3))
    b = snapshot(write_toy_world(tmp_path / "b", 8, 2, 2, image_size=64, seed=3))
    c = snapshot(write_toy_world(tmp_path / "c", 8, 2, 2, image_size=64, seed=4))
    assert a == b and a != c
    # scene i does not depend on how many scenes are written
    scene = render_scene(3, 5, 64)
    jpeg = load_rgb(tmp_path / "a" / "JPEGImages" / "toy_000005.jpg").astype(int)
    assert np.abs(jpeg - scene.image).mean() < 5  # JPEG quality 95 (textured objects: ~4 grey levels)
    assert np.array_equal(scene.mask, load_mask(tmp_path / "a" / "SegmentationClass" / "toy_000005.png"))


def test_labels_boxes_and_masks_agree(tmp_path):
    root = write_toy_world(tmp_path / "w", num_train=30, num_val=0, num_test=0, image_size=96, seed=2)
    for image_id in read_split(root, "train"):
        xml = ET.parse(root / "Annotations" / f"{image_id}.xml").getroot()
        assert xml.findtext("scene") in TOY_BACKGROUNDS
        mask = load_mask(root / "SegmentationClass" / f"{image_id}.png")
        assert mask.shape == (96, 96) and load_rgb(root / "JPEGImages" / f"{image_id}.jpg").shape == (96, 96, 3)
        labels = parse_labels(root / "Annotations" / f"{image_id}.xml", TOY_CLASSES)
        assert 1 <= len(labels) <= 3
        assert set(labels) == {int(v) - 1 for v in np.unique(mask) if v != 0}
        for obj in xml.findall("object"):  # each box holds pixels of its class on all four sides
            c = TOY_CLASSES.index(obj.findtext("name")) + 1
            x0, y0, x1, y1 = (int(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax"))
            inner = mask[y0 - 1 : y1, x0 - 1 : x1] == c
            assert inner[0].any() and inner[-1].any() and inner[:, 0].any() and inner[:, -1].any()


def test_scene_mask_and_instances(scenes):
    for scene in scenes[:50]:
        assert scene.image.dtype == np.uint8 and scene.image.shape == (96, 96, 3)
        for k, (name, _) in enumerate(scene.objects):
            assert np.all(scene.mask[scene.instances == k] == TOY_CLASSES.index(name) + 1)
        assert np.all(scene.mask[scene.instances < 0] == 0)


def test_occlusion_keeps_every_object_visible(scenes):
    occluded = 0
    for scene in scenes:
        visible = np.bincount(scene.instances[scene.instances >= 0], minlength=len(scene.areas))
        assert len(visible) == len(scene.objects) == len(scene.areas)
        assert np.all(visible >= MIN_VISIBLE * np.asarray(scene.areas)), "an object lost more than the allowed share"
        assert np.all(visible <= scene.areas)
        occluded += int(np.any(visible < scene.areas))
    assert occluded >= 10  # occlusion does happen (40 of 400 scenes here)


def test_object_scales_from_small_to_large(scenes):
    sides = [max(x1 - x0, y1 - y0) + 1 for s in scenes for _, (x0, y0, x1, y1) in s.objects]
    assert min(sides) <= 16 and max(sides) >= 56  # ≈2 patches of 8 px up to well over half the 96 px image
    assert Counter(len(s.objects) for s in scenes).keys() == {1, 2, 3}


def test_every_class_and_background_occurs(scenes):
    assert {name for s in scenes for name in s.labels} == set(TOY_CLASSES)
    assert {s.background for s in scenes} == set(TOY_BACKGROUNDS)


def test_classes_co_occur_with_their_home_background(scenes):
    first_home = np.mean([HOME_BACKGROUND[s.objects[0][0]] == s.background for s in scenes])
    assert abs(first_home - P_HOME) < 0.07  # the first object sets the scene
    for name in TOY_CLASSES:  # and each class is seen on its home background most of the time
        backgrounds = Counter(s.background for s in scenes if name in s.labels)
        assert backgrounds.most_common(1)[0][0] == HOME_BACKGROUND[name]
        assert backgrounds[HOME_BACKGROUND[name]] / sum(backgrounds.values()) > 0.5


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    root = tmp_path / "VOC2012"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "JPEGImages" / "2007_000032.jpg").write_bytes(b"real data")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        write_toy_world(root, 2, 1, 1, image_size=64)
    with pytest.raises(ValueError, match="refusing to overwrite"):
        ensure_toy_world(root, num_train=2, num_val=1, num_test=1, image_size=64)
    assert (root / "JPEGImages" / "2007_000032.jpg").read_bytes() == b"real data"
    assert not (root / "ImageSets").exists()


def test_ensure_skips_matching_world_and_rewrites_otherwise(tmp_path):
    root = tmp_path / "w"
    ensure_toy_world(root, num_train=6, num_val=2, num_test=2, image_size=64)
    marker = root / ".toy_world_complete"
    stamp = marker.stat().st_mtime_ns
    ensure_toy_world(root, num_train=6, num_val=2, num_test=2, image_size=64)
    assert marker.stat().st_mtime_ns == stamp  # nothing rewritten
    ensure_toy_world(root, num_train=3, num_val=1, num_test=1, image_size=64)  # smaller: leftovers removed
    assert len(list((root / "JPEGImages").glob("toy_*"))) == 5 and read_split(root, "test") == ["toy_000004"]
    marker.write_text("{damaged")
    ensure_toy_world(root, num_train=3, num_val=1, num_test=1, image_size=64)
    assert json.loads(marker.read_text())["num_train"] == 3
    with pytest.raises(TypeError, match="keywords of write_toy_world"):
        ensure_toy_world(root, num_images=3)
    with pytest.raises(ValueError, match="image_size"):
        write_toy_world(root, 1, 1, 1, image_size=8)


def test_source_reads_the_world(tmp_path):
    source = ToyWorldSource(tmp_path / "VOC2012", num_train=4, num_val=2, num_test=2, image_size=64, seed=5)
    source.prepare()
    split = source.read("test")
    assert split.ids == ["toy_000006", "toy_000007"]
    assert split.class_names == list(TOY_CLASSES) and split.prompt_names == list(TOY_CLASSES)
    assert all(p is not None and p.is_file() for p in split.gt_paths) and all(split.labels)


def test_toy_world_source_checks_split_names_and_sizes_before_writing(tmp_path):
    """The preflight check passes for an unwritten world (prepare writes it) and names the option to fix."""
    source = ToyWorldSource(tmp_path / "never_written", num_train=3, num_val=0)
    source.check("train")
    assert not (tmp_path / "never_written").exists()
    with pytest.raises(ValueError, match="num_val above 0"):
        source.check("val")
    with pytest.raises(ValueError, match="train, val, test; got 'train_aug'"):
        source.check("train_aug")
