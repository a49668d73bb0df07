"""benchmarks/toy_world_quality.py's ``--image_scale``: images enlarged smoothly, ground truths block by block."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "toy_world_quality.py"


def load_script():
    spec = importlib.util.spec_from_file_location("toy_world_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_enlarge_repeats_each_label_and_keeps_the_ignore_value():
    enlarge = load_script().enlarge
    gt = np.array([[0, 3], [10, 255]], np.uint8)
    image = np.zeros((2, 2, 3), np.uint8)
    image[0, 1] = 200
    (big_image,), (big_gt,) = enlarge([image], [gt], 3)
    assert big_gt.shape == (6, 6) and big_image.shape == (6, 6, 3)
    assert np.array_equal(big_gt, np.kron(gt, np.ones((3, 3), np.uint8)))  # nearest: no label invented
    assert 0 < big_image[3, 3, 0] < 200  # bicubic: the bright pixel's edge is blended, not copied


def test_enlarge_by_one_returns_the_same_arrays():
    enlarge = load_script().enlarge
    images, gts = [np.zeros((4, 4, 3), np.uint8)], [np.ones((4, 4), np.uint8)]
    assert enlarge(images, gts, 1.0) == (images, gts)
