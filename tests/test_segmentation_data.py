"""Student data: pseudo-labels made in the job, the store, augmentation, CGL targets (issue #3)."""
import numpy as np
import pytest
import torch

from lightning_clipes.components.pseudo_mask import apply_confidence_threshold, mask_and_confidence
from lightning_clipes.data.segmentation_datamodule import VOCSegmentationDataModule
from lightning_clipes.data.segmentation_sets import train_transform
from lightning_clipes.data.voc_format import read_split
from lightning_clipes.labeler import CLIPESLabeler


def make_labeler(ckpt, **kw):
    return CLIPESLabeler(model_name="ViT-B-16", pretrained=str(ckpt), affinity_layers=2, preview_images=0, **kw)


def make_data(voc, tmp_path, labeler, **kw):
    kw = {"split": "train", "val_split": "val", "store_dir": str(tmp_path / "store"), "crop_size": 32,
          "batch_size": 2, "num_workers": 0, "labeler": labeler, **kw}
    return VOCSegmentationDataModule(str(voc), **kw)


def test_masks_and_confidence_by_hand():
    cams = torch.tensor([[[0.9, 0.2]], [[0.3, 0.6]]])  # K=2, 1x2 image
    mask, conf = mask_and_confidence(cams, torch.tensor([4, 9]), power=1.0)
    # pixel 0: scores [0.1, 0.9, 0.3] -> class 5, 0.9/1.3; pixel 1: [0.4, 0.2, 0.6] -> class 10, 0.6/1.2
    assert mask.tolist() == [[5, 10]]
    torch.testing.assert_close(conf, torch.tensor([[0.9 / 1.3, 0.5]]))
    assert apply_confidence_threshold(np.array([[5, 10]]), conf.numpy(), 0.6).tolist() == [[5, 255]]


def test_pass_labels_every_image_once_and_the_store_is_reused(synthetic_voc, tiny_openai_ckpt, tmp_path):
    dm = make_data(synthetic_voc, tmp_path, make_labeler(tiny_openai_ckpt))
    dm.setup("fit")
    ids = read_split(synthetic_voc, "train")
    assert sorted(dm.train_set.ids) == sorted(ids)
    assert dm.store.root.parent == tmp_path / "store"
    stamps = {i: dm.store.mask_path(i).stat().st_mtime_ns for i in ids}
    again = make_data(synthetic_voc, tmp_path, make_labeler(tiny_openai_ckpt))
    again.setup("fit")
    assert again.store.root == dm.store.root
    assert all(again.store.mask_path(i).stat().st_mtime_ns == t for i, t in stamps.items())
    other = make_data(synthetic_voc, tmp_path, make_labeler(tiny_openai_ckpt, bg_power=2.0))
    other.setup("fit")
    assert other.store.root != dm.store.root  # another labeler configuration, another store


def test_training_items_are_augmented_crops_with_thresholded_masks(synthetic_voc, tiny_openai_ckpt, tmp_path):
    dm = make_data(synthetic_voc, tmp_path, make_labeler(tiny_openai_ckpt), confidence_threshold=0.5)
    dm.setup("fit")
    item = dm.train_set[0]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert 0 <= item["image"].min() and item["image"].max() <= 1
    assert item["mask"].shape == (32, 32) and item["mask"].dtype == torch.int64
    low = (item["confidence"] < 0.5) & (item["mask"] != 255)
    assert not low.any()
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 32, 32) and batch["mask"].shape == (2, 32, 32)


def test_augmentation_moves_image_mask_and_confidence_together():
    from scipy import ndimage

    rng = np.random.default_rng(0)
    mask = np.kron(rng.integers(0, 3, (4, 5)), np.ones((10, 10))).astype(np.uint8)  # 10-px blocks
    image = np.stack([mask * 100] * 3, axis=-1).astype(np.uint8)  # colour encodes the class
    confidence = mask.astype(np.float32) / 2
    t = train_transform(32, (0.5, 1.5), hflip=True, color_jitter=0.0)
    for seed in range(10):
        t.set_random_seed(seed)
        out = t(image=image, mask=mask, confidence=confidence)
        m, img, conf = out["mask"], out["image"], out["confidence"]
        assert m.shape == (32, 32) and img.shape == (32, 32, 3)
        valid = m != 255
        # away from block edges (where the image is interpolated) the colour still says the class
        interior = valid & (ndimage.maximum_filter(m, 3) == ndimage.minimum_filter(m, 3))
        agree = np.abs(img[..., 0].astype(int) - m.astype(int) * 100) < 5
        assert agree[interior].mean() > 0.95
        np.testing.assert_array_equal(conf[valid], m[valid].astype(np.float32) / 2)


def test_corrupt_store_entry_is_recomputed(synthetic_voc, tiny_openai_ckpt, tmp_path):
    dm = make_data(synthetic_voc, tmp_path, make_labeler(tiny_openai_ckpt))
    dm.setup("fit")
    victim = dm.train_set.ids[0]
    path = dm.store.mask_path(victim)
    path.write_bytes(path.read_bytes()[:20])
    again = make_data(synthetic_voc, tmp_path, make_labeler(tiny_openai_ckpt))
    again.setup("fit")
    assert again.store.read_record(victim) is not None and victim in again.train_set.ids
    again.store.read(victim)  # decodes again


def test_image_without_masks_is_skipped_and_counted(synthetic_voc, tiny_openai_ckpt, tmp_path):
    ids = read_split(synthetic_voc, "train")
    bad = synthetic_voc / "JPEGImages" / f"{ids[2]}.jpg"
    bad.write_bytes(bad.read_bytes()[:100])
    dm = make_data(synthetic_voc, tmp_path, make_labeler(tiny_openai_ckpt))
    with pytest.raises(RuntimeError, match=rf"1 of 6 images .*{ids[2]}.*Truncated.*max_failed_fraction=0.01"):
        dm.setup("fit")  # 1/6 is more than the default 1 %: no training on a silently shrunken set
    dm = make_data(synthetic_voc, tmp_path, make_labeler(tiny_openai_ckpt), max_failed_fraction=0.2)
    with pytest.warns(UserWarning, match=r"1 of 6 images .* have no pseudo-label"):
        dm.setup("fit")
    assert ids[2] not in dm.train_set.ids and len(dm.train_set) == len(ids) - 1


def test_missing_split_and_missing_root_say_what_to_do(synthetic_voc, tiny_openai_ckpt, tmp_path):
    with pytest.raises(FileNotFoundError, match="train.*val"):
        make_data(synthetic_voc, tmp_path, None, split="train_aug").setup("fit")
    with pytest.raises(FileNotFoundError, match="--data.root"):
        make_data(tmp_path / "nowhere", tmp_path, None).setup("fit")


def test_class_count_mismatch_is_refused(synthetic_voc, tiny_openai_ckpt, tmp_path):
    labeler = CLIPESLabeler(model_name="ViT-B-16", pretrained=str(tiny_openai_ckpt), class_names=["cat", "dog"])
    with pytest.raises(ValueError, match="one prompt name per dataset class"):
        make_data(synthetic_voc, tmp_path, labeler)


def test_crf_masks_are_made_in_worker_processes_and_match_a_direct_call(synthetic_voc, tiny_openai_ckpt, tmp_path):
    pytest.importorskip("pydensecrf.densecrf")
    from lightning_clipes.components.crf import CRFParams, crf_label
    from lightning_clipes.components.pseudo_mask import scores_with_background
    from lightning_clipes.data.voc_format import load_rgb

    labeler = make_labeler(tiny_openai_ckpt, crf=True)
    dm = make_data(synthetic_voc, tmp_path, labeler, crf_workers=1)
    dm.setup("fit")
    image_id = dm.train_set.ids[0]
    mask, confidence = dm.store.read(image_id)
    item = dm.build_dataset("train")[0]
    (maps,) = labeler.clipes([labeler.clipes.preprocess(item["image"])], [item["labels"]], [item["image"].shape[:2]])
    winner, q = crf_label(load_rgb(dm.train_set.paths[0]), scores_with_background(maps.cams).numpy(), CRFParams())
    lut = np.array([0, *[k + 1 for k in item["labels"]]])
    # the pass labels a whole batch at once: float32 noise, not a different computation
    assert (mask == lut[winner]).mean() > 0.99
    np.testing.assert_allclose(confidence, q, atol=1e-3 + 1 / 60000)  # stored as 16-bit


def test_crf_without_pydensecrf_fails_at_start_with_the_install_command(tiny_openai_ckpt, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    with pytest.raises(ImportError, match=r"pip install pydensecrf2.*crf: false"):
        make_labeler(tiny_openai_ckpt, crf=True)


def test_node_local_cache_is_filled_and_read(synthetic_voc, tiny_openai_ckpt, tmp_path):
    dm = make_data(synthetic_voc, tmp_path, make_labeler(tiny_openai_ckpt), cache_dir=str(tmp_path / "local"))
    dm.setup("fit")
    local = tmp_path / "local" / dm.store.root.name
    assert sorted(p.stem for p in (local / "masks").glob("*.png")) == sorted(dm.train_set.ids)
    assert dm.train_set.read_mask.__self__.root == local  # training reads the node-local copy
    (local / "masks" / f"{dm.train_set.ids[0]}.png").unlink()
    dm2 = make_data(synthetic_voc, tmp_path, make_labeler(tiny_openai_ckpt), cache_dir=str(tmp_path / "local"))
    dm2.setup("fit")
    assert (local / "masks" / f"{dm.train_set.ids[0]}.png").is_file()  # refilled


def test_augmentation_follows_torch_seed(synthetic_voc, tmp_path):
    """Each DataLoader worker seeds torch differently; the crops must follow torch, not a shared generator."""
    dm = make_data(synthetic_voc, tmp_path, None)
    with pytest.warns(UserWarning, match="GROUND-TRUTH"):
        dm.setup("fit")
    torch.manual_seed(0)
    a = dm.train_set[0]["image"]
    torch.manual_seed(0)
    b = dm.train_set[0]["image"]
    torch.manual_seed(1)
    c = dm.train_set[0]["image"]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_pictures_get_the_pseudo_labels_the_pass_stores(synthetic_voc, tiny_openai_ckpt, tmp_path):
    """The val images labelled for the student's panels (in memory) get the masks the pass writes: with the
    training split as val split, each equals the store's mask under the same confidence threshold."""
    dm = make_data(synthetic_voc, tmp_path, make_labeler(tiny_openai_ckpt), val_split="train",
                   confidence_threshold=0.5, panel_pseudo_labels=2)
    dm.setup("fit")
    ids = read_split(synthetic_voc, "train")[:2]
    assert list(dm.panel_labels) == ids
    for image_id in ids:
        mask, confidence = dm.store.read(image_id)
        expected = apply_confidence_threshold(mask, confidence, 0.5)
        assert 0 < (expected == 255).sum() < expected.size  # both kinds of pixel occur
        np.testing.assert_array_equal(dm.panel_labels[image_id], expected)
    off = make_data(synthetic_voc, tmp_path, make_labeler(tiny_openai_ckpt), panel_pseudo_labels=0)
    off.setup("fit")
    assert off.panel_labels == {}
