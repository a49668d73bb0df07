"""VOC layout I/O against hand-written XML, split files and hand-built images."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from lightning_clipes.data.voc_format import (
    VOC_CLASSES,
    ImageReadError,
    ground_truth_path,
    load_mask,
    load_rgb,
    parse_labels,
    read_split,
    save_mask_png,
    voc_palette,
)


def write_xml(path, *names: str):
    objects = "".join(f"<object><name>{n}</name><bndbox><xmin>1</xmin></bndbox></object>" for n in names)
    path.write_text(f"<annotation><filename>x.jpg</filename>{objects}</annotation>")
    return path


def test_classes_and_palette():
    assert len(VOC_CLASSES) == 20 and VOC_CLASSES[0] == "aeroplane" and VOC_CLASSES[-1] == "tvmonitor"
    assert VOC_CLASSES.index("dog") == 11 and VOC_CLASSES.index("person") == 14
    pal = voc_palette()
    assert len(pal) == 768 and all(isinstance(v, int) for v in pal)
    colour = {i: tuple(pal[3 * i: 3 * i + 3]) for i in range(256)}
    assert colour[0] == (0, 0, 0) and colour[1] == (128, 0, 0) and colour[2] == (0, 128, 0)
    assert colour[15] == (192, 128, 128) and colour[20] == (0, 64, 128) and colour[255] == (224, 224, 192)


def test_parse_labels_order_dedup_and_whitespace(tmp_path):
    assert parse_labels(write_xml(tmp_path / "a.xml", "dog", "person", "dog", "cat"), VOC_CLASSES) == [11, 14, 7]
    assert parse_labels(write_xml(tmp_path / "b.xml", "\n  sheep \t", "aeroplane"), VOC_CLASSES) == [16, 0]
    assert parse_labels(write_xml(tmp_path / "c.xml"), VOC_CLASSES) == []
    assert parse_labels(write_xml(tmp_path / "d.xml", "cat", "dog"), ["dog", "cat"]) == [1, 0]


def test_parse_labels_errors_name_the_problem(tmp_path):
    bad = write_xml(tmp_path / "bad.xml", "dog", "unicorn")
    with pytest.raises(ValueError, match="unicorn") as err:
        parse_labels(bad, VOC_CLASSES)
    assert str(bad) in str(err.value) and "tvmonitor" in str(err.value)
    broken = tmp_path / "broken.xml"
    broken.write_text("<annotation><object><name>dog</name></annotation>")
    with pytest.raises(ValueError, match="broken.xml"):
        parse_labels(broken, VOC_CLASSES)
    with pytest.raises(FileNotFoundError, match="missing.xml"):
        parse_labels(tmp_path / "missing.xml", VOC_CLASSES)


def test_read_split(tmp_path):
    folder = tmp_path / "ImageSets" / "Segmentation"
    folder.mkdir(parents=True)
    (folder / "train.txt").write_text("2007_000032\n\n  2007_000039  \n2007_000063 1\n\n")
    (folder / "val.txt").write_text("2007_000033\n")
    assert read_split(tmp_path, "train") == ["2007_000032", "2007_000039", "2007_000063"]
    assert read_split(tmp_path, "val") == ["2007_000033"]
    with pytest.raises(FileNotFoundError) as err:
        read_split(tmp_path, "trainaug")
    assert "trainaug.txt" in str(err.value) and "train, val" in str(err.value)
    with pytest.raises(FileNotFoundError, match="JPEGImages"):
        read_split(tmp_path / "elsewhere", "train")


def test_load_rgb_rgb_files_equal_pillow(tmp_path):
    rng = np.random.default_rng(0)
    for w, h in ((1, 1), (10, 7), (33, 20)):
        arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        for ext in ("png", "jpg"):
            path = tmp_path / f"im_{w}x{h}.{ext}"
            Image.fromarray(arr).save(path)
            out = load_rgb(path)
            assert out.shape == (h, w, 3) and out.dtype == np.uint8
            np.testing.assert_array_equal(out, np.asarray(Image.open(path).convert("RGB")))
            if ext == "png":
                np.testing.assert_array_equal(out, arr)


def test_load_rgb_other_modes(tmp_path):
    grey = np.array([[0, 50, 255], [7, 128, 200]], np.uint8)
    Image.fromarray(grey, "L").save(tmp_path / "l.png")
    np.testing.assert_array_equal(load_rgb(tmp_path / "l.png"), np.repeat(grey[..., None], 3, axis=2))

    Image.fromarray(np.stack([grey, 255 - grey], -1), "LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(load_rgb(tmp_path / "la.png"), np.repeat(grey[..., None], 3, axis=2))

    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 10, 20, 30, [[0, 128, 255], [255, 1, 2]]
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    assert np.all(load_rgb(tmp_path / "rgba.png") == [10, 20, 30])  # alpha dropped, colour untouched

    pal = Image.frombytes("P", (3, 1), bytes([0, 1, 2]))
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (253 * 3))
    pal.save(tmp_path / "p.png")
    np.testing.assert_array_equal(load_rgb(tmp_path / "p.png"), [[[0, 0, 0], [255, 0, 0], [0, 0, 255]]])

    Image.new("CMYK", (5, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    out = load_rgb(tmp_path / "cmyk.jpg")
    assert out.shape == (4, 5, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.asarray(Image.open(tmp_path / "cmyk.jpg").convert("RGB")))

    bw = Image.new("1", (2, 1), 0)
    bw.putpixel((0, 0), 1)
    bw.save(tmp_path / "bw.png")
    np.testing.assert_array_equal(load_rgb(tmp_path / "bw.png"), [[[255] * 3, [0] * 3]])


def test_load_rgb_high_bit_depth(tmp_path):
    Image.fromarray(np.array([[0, 257 * 100, 65535]], np.uint16)).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    np.testing.assert_array_equal(load_rgb(tmp_path / "g16.png"), [[[0] * 3, [100] * 3, [255] * 3]])
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32)).save(tmp_path / "f01.tiff")
    np.testing.assert_array_equal(load_rgb(tmp_path / "f01.tiff")[..., 0], [[0, 128, 255]])
    Image.fromarray(np.array([[-5.0, 100.0, 300.0]], np.float32)).save(tmp_path / "f.tiff")
    np.testing.assert_array_equal(load_rgb(tmp_path / "f.tiff")[..., 0], [[0, 100, 255]])


def test_load_rgb_errors_name_the_file(tmp_path):
    path = tmp_path / "cut_2007_000032.jpg"
    arr = np.random.default_rng(1).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageReadError, match="cut_2007_000032.jpg"):
        load_rgb(path)
    png = tmp_path / "cut.png"
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    png.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageReadError, match="cut.png"):
        load_rgb(png)
    (tmp_path / "junk.jpg").write_bytes(b"not an image")
    with pytest.raises(OSError, match="junk.jpg"):
        load_rgb(tmp_path / "junk.jpg")
    with pytest.raises(FileNotFoundError, match="nothere.jpg"):
        load_rgb(tmp_path / "nothere.jpg")


def test_mask_round_trip_palette_and_file_objects(tmp_path):
    mask = np.array([[0, 1, 15], [20, 255, 3]], np.uint8)
    save_mask_png(tmp_path / "m.png", mask)
    img = Image.open(tmp_path / "m.png")
    assert img.mode == "P"
    rgb = np.asarray(img.convert("RGB"))
    assert tuple(rgb[0, 1]) == (128, 0, 0) and tuple(rgb[0, 2]) == (192, 128, 128)
    assert tuple(rgb[1, 1]) == (224, 224, 192)
    out = load_mask(tmp_path / "m.png")
    assert out.dtype == np.uint8 and out.shape == (2, 3)
    np.testing.assert_array_equal(out, mask)

    buf = io.BytesIO()
    save_mask_png(buf, mask.astype(np.int64))
    (tmp_path / "b.png").write_bytes(buf.getvalue())
    np.testing.assert_array_equal(load_mask(tmp_path / "b.png"), mask)

    Image.fromarray(mask, "L").save(tmp_path / "l.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "l.png"), mask)
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="rgb.png"):
        load_mask(tmp_path / "rgb.png")
    with pytest.raises(FileNotFoundError, match="gone.png"):
        load_mask(tmp_path / "gone.png")
    for bad in (np.zeros((2, 2, 3), np.uint8), np.array([[256, 0]]), np.array([[-1, 0]]), np.zeros((2, 2)) + 0.5):
        with pytest.raises(ValueError):
            save_mask_png(tmp_path / "bad.png", bad)


def test_ground_truth_path_prefers_aug(tmp_path):
    assert ground_truth_path(tmp_path, "a") is None
    (tmp_path / "SegmentationClass").mkdir()
    save_mask_png(tmp_path / "SegmentationClass" / "a.png", np.zeros((2, 2), np.uint8))
    assert ground_truth_path(tmp_path, "a") == tmp_path / "SegmentationClass" / "a.png"
    (tmp_path / "SegmentationClassAug").mkdir()
    save_mask_png(tmp_path / "SegmentationClassAug" / "a.png", np.zeros((2, 2), np.uint8))
    assert ground_truth_path(tmp_path, "a") == tmp_path / "SegmentationClassAug" / "a.png"
    assert ground_truth_path(tmp_path, "b") is None
