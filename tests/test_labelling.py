"""The one labelling function (issue #8): CRF on and off through predict and validate, every stage's
mIoU and the confidence coverage, meta.json, and what counts as a bad image."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_clipes.cli import cli_main
from lightning_clipes.components.crf import CRFParams, crf_label
from lightning_clipes.components.labelling import Labeller
from lightning_clipes.components.pseudo_mask import cams_to_label
from lightning_clipes.data.voc_format import load_mask, load_rgb, read_split

pytest.importorskip("pydensecrf.densecrf")
REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "experiments" / "voc_pseudo_labels.yaml")


def run(stage, voc, ckpt, out, *extra):
    args = [stage, "-c", CONFIG, "--data.root", str(voc), "--data.split", "train", "--model.pretrained", str(ckpt),
            "--trainer.default_root_dir", str(out), "--trainer.accelerator", "cpu", "--data.num_workers", "0",
            "--model.affinity_layers", "2", "--model.precision", "32", *extra]
    return cli_main(args)


def confusion_miou(pairs, n=21):
    conf = np.zeros((n, n), np.int64)
    for gt, pred in pairs:
        keep = gt != 255
        np.add.at(conf, (gt[keep].astype(np.int64), pred[keep].astype(np.int64)), 1)
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    return float(np.mean(tp[union > 0] / union[union > 0]))


def test_crf_on_and_off_give_different_masks_and_scores(synthetic_voc, tiny_openai_ckpt, tmp_path):
    ids = read_split(synthetic_voc, "train")
    run("predict", synthetic_voc, tiny_openai_ckpt, tmp_path / "crf", "--model.crf", "true")
    run("predict", synthetic_voc, tiny_openai_ckpt, tmp_path / "plain", "--model.crf", "false")
    changed = 0
    for image_id in ids:
        store = tmp_path / "crf" / "pseudo_labels"
        with np.load(store / "cams" / f"{image_id}.npz") as f:
            keys, cams = f["keys"], f["cams"].astype(np.float32)
        mask = load_mask(store / "masks" / f"{image_id}.png")
        plain = load_mask(tmp_path / "plain" / "pseudo_labels" / "masks" / f"{image_id}.png")
        # independent: the CRF of the published settings on the stored cams, as the reference's eval_cam_with_crf
        scores = np.concatenate([1 - cams.max(0, keepdims=True), cams]).astype(np.float32)
        winner, _ = crf_label(load_rgb(synthetic_voc / "JPEGImages" / f"{image_id}.jpg"), scores, CRFParams())
        expected = np.concatenate([[0], keys + 1])[winner]
        assert (mask == expected).mean() > 0.97  # cams stored as float16: a few pixels may tip
        assert (plain == cams_to_label(torch.from_numpy(cams), torch.from_numpy(keys)).numpy()).mean() > 0.99
        changed += int((mask != plain).any())
    assert changed > 0
    meta = json.loads((tmp_path / "crf" / "pseudo_labels" / "meta.json").read_text())
    assert meta["labeler"]["crf"] == {"iterations": 10, "gaussian_sxy": 1.0, "gaussian_compat": 3.0,
                                      "bilateral_sxy": 67.0, "bilateral_srgb": 3.0, "bilateral_compat": 4.0}
    assert meta["confidence"].startswith("max Q") and meta["labeler"]["background"][:3] == ["ground", "land", "grass"]
    assert json.loads((tmp_path / "plain" / "pseudo_labels" / "meta.json").read_text())["labeler"]["crf"] is None

    on = run("validate", synthetic_voc, tiny_openai_ckpt, tmp_path / "v1", "--model.crf", "true").trainer.callback_metrics
    off = run("validate", synthetic_voc, tiny_openai_ckpt, tmp_path / "v2", "--model.crf", "false").trainer.callback_metrics
    assert float(on["pseudo/mIoU"]) == pytest.approx(float(on["pseudo/mIoU_crf"]))
    assert float(off["pseudo/mIoU"]) == pytest.approx(float(off["pseudo/mIoU_caa"]))
    assert "pseudo/mIoU_crf" not in off
    assert float(on["pseudo/mIoU"]) != pytest.approx(float(off["pseudo/mIoU"]), abs=1e-6)
    assert float(on["pseudo/mIoU_caa"]) == pytest.approx(float(off["pseudo/mIoU_caa"]), abs=1e-6)  # same CAA stage
    gts = [load_mask(synthetic_voc / "SegmentationClass" / f"{i}.png") for i in ids]
    for metrics, folder in ((on, "crf"), (off, "plain")):
        masks = [load_mask(tmp_path / folder / "pseudo_labels" / "masks" / f"{i}.png") for i in ids]
        assert float(metrics["pseudo/mIoU"]) == pytest.approx(confusion_miou(zip(gts, masks)), abs=0.02)


def test_confidence_coverage_is_the_share_of_confident_pixels_and_their_accuracy(synthetic_voc, tiny_openai_ckpt, tmp_path):
    run("predict", synthetic_voc, tiny_openai_ckpt, tmp_path / "p", "--model.confidence_threshold", "0.6")
    metrics = run("validate", synthetic_voc, tiny_openai_ckpt, tmp_path / "v",
                  "--model.confidence_threshold", "0.6").trainer.callback_metrics
    from lightning_clipes.data.store import PseudoLabelStore

    store = PseudoLabelStore(tmp_path / "p" / "pseudo_labels")
    pixels = confident = right = 0
    for image_id in read_split(synthetic_voc, "train"):
        mask, conf = store.read(image_id)
        gt = load_mask(synthetic_voc / "SegmentationClass" / f"{image_id}.png")
        valid = gt != 255
        sure = valid & (conf >= 0.6)
        pixels, confident, right = pixels + valid.sum(), confident + sure.sum(), right + (sure & (mask == gt)).sum()
    assert 0 < confident < pixels
    assert float(metrics["pseudo/confident_fraction"]) == pytest.approx(confident / pixels, abs=0.01)
    assert float(metrics["pseudo/confident_accuracy"]) == pytest.approx(right / confident, abs=0.01)


class FakeCLIPES:
    """Stands in for CLIPES: uniform maps, or the error a test asks for."""

    max_side = None

    def __init__(self, fail=None):
        self.fail, self.calls = fail, []

    def preprocess(self, image):
        return torch.zeros(3, 16, 16)

    def __call__(self, pixels, labels, sizes):
        self.calls.append(len(pixels))
        if self.fail is not None:
            err = self.fail(len(pixels), labels)
            if err is not None:
                raise err
        from lightning_clipes.components.clipes import ClassMaps

        return [ClassMaps(torch.tensor(lab), torch.full((len(lab), *s), 0.8), torch.full((len(lab), *s), 0.7))
                for lab, s in zip(labels, sizes)]


def items(n, size=(4, 5)):
    return [{"id": f"i{k}", "image": np.zeros((*size, 3), np.uint8), "labels": [k % 3], "gt": None, "error": None}
            for k in range(n)]


def test_one_bad_image_is_retried_alone_and_skipped_the_rest_goes_on():
    fail = lambda n, labels: ValueError("bad labels") if [2] in labels else None  # noqa: E731 - image i2
    labeller = Labeller(FakeCLIPES(fail))
    done = labeller(items(4))
    assert [d.item["id"] for d in done] == ["i0", "i1", "i3"] and list(labeller.failed) == ["i2"]
    assert labeller.clipes.calls == [4, 1, 1, 1, 1]
    assert done[0].mask.dtype == np.uint8 and done[0].mask.shape == (4, 5)
    np.testing.assert_allclose(done[0].confidence, 0.8 / (0.8 + 0.2))  # our share confidence, by hand


def test_out_of_memory_on_a_batch_goes_image_by_image():
    fail = lambda n, labels: torch.OutOfMemoryError("CUDA out of memory") if n > 1 else None  # noqa: E731
    labeller = Labeller(FakeCLIPES(fail))
    assert len(labeller(items(3))) == 3 and not labeller.failed


def test_device_faults_stop_the_job_instead_of_counting_as_bad_images():
    fail = lambda n, labels: RuntimeError("CUDA error: an illegal memory access was encountered")  # noqa: E731
    with pytest.raises(RuntimeError, match="illegal memory access"):
        Labeller(FakeCLIPES(fail))(items(2))


def test_unreadable_items_and_crf_failures_are_reported_per_image(monkeypatch):
    from lightning_clipes.components import labelling

    batch = items(3)
    batch[1]["error"] = "Cannot decode image x.jpg"
    real = labelling.crf_mask

    def flaky(image, scores, params, max_side=None):
        if image.shape == (9, 9, 3):
            raise MemoryError("CRF out of memory")
        return real(image, scores, params, max_side)

    monkeypatch.setattr(labelling, "crf_mask", flaky)
    batch[2]["image"] = np.zeros((9, 9, 3), np.uint8)
    labeller = Labeller(FakeCLIPES(), crf=CRFParams(), keep_stages=True)
    done = labeller(batch)
    assert [d.item["id"] for d in done] == ["i0"]
    assert labeller.failed["i1"] == "Cannot decode image x.jpg" and "CRF out of memory" in labeller.failed["i2"]
    assert set(done[0].stages) == {"cam", "caa", "crf"}


def test_crf_in_worker_processes_equals_inline():
    rng = np.random.default_rng(0)
    batch = items(3, size=(12, 10))
    for it in batch:
        it["image"] = rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)
    inline = Labeller(FakeCLIPES(), crf=CRFParams())(batch)
    with Labeller(FakeCLIPES(), crf=CRFParams(), crf_workers=1) as pooled:
        later = pooled(batch) + pooled.finish()
    assert [d.item["id"] for d in later] == ["i0", "i1", "i2"]
    for a, b in zip(inline, later):
        np.testing.assert_array_equal(a.mask, b.mask)
        np.testing.assert_allclose(a.confidence, b.confidence)


def test_crf_on_a_huge_image_runs_at_the_capped_size(monkeypatch):
    from lightning_clipes.components import labelling

    seen = []
    real = labelling.dense_crf

    def spy(image, scores, params):
        seen.append(image.shape)
        return real(image, scores, params)

    monkeypatch.setattr(labelling, "dense_crf", spy)
    image = np.zeros((300, 200, 3), np.uint8)
    image[:, 100:] = 255
    scores = np.stack([np.full((300, 200), 0.5, np.float32), np.zeros((300, 200), np.float32)])
    scores[1, :, 100:] = 1.0
    winner, confidence = labelling.crf_mask(image, scores, CRFParams(), max_side=60)
    assert seen == [(60, 40, 3)] and winner.shape == (300, 200) and confidence.shape == (300, 200)
    assert (winner[:, 110:] == 1).all() and (winner[:, :90] == 0).all()


def test_the_embedded_default_config_honours_crf_in_validate_and_predict(tmp_path):
    """Issue #8's own commands: experiments/synthetic_pseudo_labels.yaml with --model.crf true / false."""
    config = str(REPO / "experiments" / "synthetic_pseudo_labels.yaml")

    def go(stage, crf, out):
        return cli_main([stage, "-c", config, "--model.crf", crf, "--data.source.init_args.root", str(tmp_path / "VOC2012"),
                         "--data.source.init_args.num_train", "12", "--data.source.init_args.num_val", "2",
                         "--trainer.default_root_dir", str(tmp_path / out), "--trainer.enable_progress_bar", "false"])

    on = {k: float(v) for k, v in go("validate", "true", "v_on").trainer.callback_metrics.items()}
    off = {k: float(v) for k, v in go("validate", "false", "v_off").trainer.callback_metrics.items()}
    assert on["pseudo/mIoU"] == on["pseudo/mIoU_crf"] != off["pseudo/mIoU"] == off["pseudo/mIoU_caa"]
    assert on["pseudo/mIoU_caa"] == off["pseudo/mIoU_caa"]  # the same maps before the CRF
    go("predict", "true", "p_on")
    go("predict", "false", "p_off")
    ids = read_split(tmp_path / "VOC2012", "train")
    masks = {out: [load_mask(tmp_path / out / "pseudo_labels" / "masks" / f"{i}.png") for i in ids]
             for out in ("p_on", "p_off")}
    assert any((a != b).any() for a, b in zip(masks["p_on"], masks["p_off"]))
    assert json.loads((tmp_path / "p_on" / "pseudo_labels" / "meta.json").read_text())["labeler"]["crf"] is not None


def test_auto_precision_is_float16_on_cuda_and_float32_on_cpu():
    from lightning_clipes.components.clipes import resolve_precision

    assert resolve_precision("auto", torch.device("cuda")) == "16"
    assert resolve_precision("auto", torch.device("cpu")) == "32"  # the reference's on CPU; bf16 only on request
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(ValueError, match="one of auto, 32, bf16, 16"):
        resolve_precision("half", torch.device("cpu"))
