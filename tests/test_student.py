"""SegmentationStudent and its plain-torch parts: the confidence-guided loss, the poly schedule,
padding and test-time augmentation, val/mIoU, prediction PNGs, the optimizer from YAML and its parameter
groups, SyncBatchNorm, the evaluation CRF, checkpoints. (DeepLabV2 and warm starts: test_deeplabv2.py.)

Tiny settings only: a U-Net/ResNet-18 with random weights or a registered 1x1-conv "pixelwise" net,
32-64 px images, CPU, no logger, nothing downloaded.
"""
from __future__ import annotations

import warnings

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from lightning_clipes.components.losses import confidence_guided_loss, multi_scale_inputs_loss
from lightning_clipes.components.student_factory import (
    IMAGENET_MEAN, IMAGENET_STD, create_student, encoder_normalisation, register_architecture,
)
from lightning_clipes.data.voc_format import voc_palette
from lightning_clipes.student import SegmentationStudent
from lightning_clipes.visualize import colour_mask

# A 1x1 convolution: each pixel's label depends on its own colour only, so labels are predictable.
register_architecture("test-pixelwise", lambda encoder, weights, n: nn.Conv2d(3, n, 1))


class FixedLogits(nn.Module):
    """Returns the logits it holds whatever the image: a hand-made student prediction."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("logits", torch.zeros(1, num_classes, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], -1, *x.shape[-2:])


register_architecture("test-fixed", lambda encoder, weights, n: FixedLogits(n))


def unet(arch: str = "Unet", **kw) -> SegmentationStudent:
    torch.manual_seed(0)
    return SegmentationStudent(num_classes=3, arch=arch, encoder_name="resnet18", encoder_weights=None, **kw).eval()


def pixelwise(**kw) -> SegmentationStudent:
    """Identity 1x1 conv: pure red / green / blue pixels are classes 0 / 1 / 2 after ImageNet normalisation."""
    model = SegmentationStudent(num_classes=3, arch="test-pixelwise", encoder_name="none", encoder_weights=None, **kw)
    with torch.no_grad():
        model.model.net.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
        model.model.net.bias.zero_()
    return model


def trainer(tmp_path, **kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=tmp_path, **kw)


def colour_image(labels: np.ndarray) -> torch.Tensor:
    """(H, W) labels in {0, 1, 2} -> (3, H, W) float image, pure red / green / blue."""
    return torch.from_numpy(np.eye(3, dtype=np.float32)[labels]).permute(2, 0, 1)


def eval_loader(items: list[dict]) -> DataLoader:
    return DataLoader(items, batch_size=1)  # default collate: "id" -> [str], tensors get the batch axis


# --------------------------------------------------------------------------- loss
def test_cgl_equals_literal_per_pixel_sum_and_ignored_pixels_get_zero_gradient():
    logits = torch.tensor([[[[2.0, -1.0], [0.5, 0.0]], [[0.0, 3.0], [1.0, -2.0]], [[-1.0, 0.5], [0.0, 1.5]]]],
                          requires_grad=True)  # (1, 3, 2, 2)
    target = torch.tensor([[[0, 255], [2, 1]]])
    loss = confidence_guided_loss(logits, target)
    (grad,) = torch.autograd.grad(loss, logits)

    literal = torch.zeros(())
    kept = [(0, 0), (1, 0), (1, 1)]
    for y, x in kept:
        z = logits[0, :, y, x]
        literal = literal + (torch.log(torch.exp(z).sum()) - z[target[0, y, x]]) / len(kept)
    (literal_grad,) = torch.autograd.grad(literal, logits)
    assert loss.item() == pytest.approx(literal.item(), rel=1e-6)
    torch.testing.assert_close(grad, literal_grad)
    assert torch.equal(grad[0, :, 0, 1], torch.zeros(3))  # exactly zero, not just small


def test_cgl_all_ignored_gives_zero_with_finite_gradients():
    logits = torch.randn(2, 4, 5, 6, requires_grad=True)
    loss = confidence_guided_loss(logits, torch.full((2, 5, 6), 255))
    loss.backward()
    assert loss.item() == 0.0 and loss.requires_grad
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_cgl_matches_torch_cross_entropy_and_resizes_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 16, 12, generator=g)
    target = torch.randint(0, 5, (3, 16, 12), generator=g)
    target[torch.rand(3, 16, 12, generator=g) < 0.4] = 255
    ref = F.cross_entropy(logits, target, ignore_index=255)
    assert confidence_guided_loss(logits, target).item() == pytest.approx(ref.item(), rel=1e-5)
    small = torch.randn(3, 5, 8, 6, generator=g)
    up = F.interpolate(small, size=(16, 12), mode="bilinear", align_corners=False)
    assert confidence_guided_loss(small, target).item() == pytest.approx(
        F.cross_entropy(up, target, ignore_index=255).item(), rel=1e-5)
    with pytest.raises(ValueError, match="num_classes"):
        confidence_guided_loss(logits, torch.full((3, 16, 12), 7))


def test_msc_loss_sums_the_crop_each_scale_and_their_max_against_literal_cross_entropy():
    g = torch.Generator().manual_seed(0)
    net = nn.Conv2d(3, 4, 1)  # per-pixel logits, so each scale's map is the net on that scale's pixels
    with torch.no_grad():
        net.weight.copy_(3 * torch.randn(4, 3, 1, 1, generator=g))
        net.bias.copy_(torch.randn(4, generator=g))
    images = torch.rand(2, 3, 8, 8, generator=g)
    target = torch.randint(0, 4, (2, 8, 8), generator=g)
    target[torch.rand(2, 8, 8, generator=g) < 0.3] = 255
    loss = multi_scale_inputs_loss(net, images, target, [0.5])

    def literal_ce(logits):  # mean over the kept pixels of log-sum-exp minus the target's logit
        kept = target != 255
        picked = logits.gather(1, target.clamp(max=3)[:, None])[:, 0]
        return (logits.logsumexp(1) - picked)[kept].mean()

    full = net(images)
    half = net(images.reshape(2, 3, 4, 2, 4, 2).mean((3, 5)))  # bilinear 0.5 of an even side = mean of 2 x 2
    half_up = F.interpolate(half, size=(8, 8), mode="bilinear", align_corners=False)
    expected = literal_ce(full) + literal_ce(half_up) + literal_ce(torch.maximum(full, half_up))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss.item() > 2.5 * confidence_guided_loss(full, target).item()  # a sum of three terms, not a mean
    for bad in ([], [0.5, 0.0]):
        with pytest.raises(ValueError, match="scales"):
            multi_scale_inputs_loss(net, images, target, bad)


# ----------------------------------------------------------------- factory / forward
def test_factory_errors_and_normalisation_defaults():
    with pytest.raises(ValueError, match="deeplabv3plus"):
        create_student("NoSuchNet", "resnet18", None, 3)
    with pytest.raises(ValueError, match="encoder"):
        create_student("Unet", "no-such-encoder", None, 3)
    assert encoder_normalisation("no-such-encoder") == (IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(ValueError, match="background first"):
        SegmentationStudent(num_classes=3, arch="test-pixelwise", encoder_weights=None, class_names=["a", "b"])


def test_arch_kwargs_reach_the_smp_architecture():
    def decoder_widths(student):
        return {m.out_channels for n, m in student.named_modules() if "decoder" in n and isinstance(m, nn.Conv2d)}

    slim = SegmentationStudent(num_classes=3, arch="Unet", encoder_name="resnet18", encoder_weights=None,
                               arch_kwargs={"decoder_channels": [64, 32, 32, 16, 16]})
    default = SegmentationStudent(num_classes=3, arch="Unet", encoder_name="resnet18", encoder_weights=None)
    assert decoder_widths(slim) == {64, 32, 16} and decoder_widths(default) == {256, 128, 64, 32, 16}
    assert slim.model(torch.rand(1, 3, 64, 64)).shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match="arch_kwargs"):
        create_student("DeepLabV2", "resnet101", None, 21, {"decoder_channels": [8]})


def test_normalisation_read_from_smps_cached_config_without_network(tmp_path, monkeypatch):
    import huggingface_hub

    config = tmp_path / "config.json"
    config.write_text('{"input_space": "RGB", "input_range": [0, 255], "mean": [127.5, 127.5, 127.5], "std": [51, 51, 51]}')
    calls = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **kw: calls.append(kw) or str(config))
    assert encoder_normalisation("resnet18", "imagenet") == ((0.5, 0.5, 0.5), (0.2, 0.2, 0.2))
    assert calls and all(kw["local_files_only"] for kw in calls)


def test_forward_on_odd_sizes_and_tta_against_literal_computation():
    model = unet()
    x = torch.rand(1, 3, 37, 53)
    with torch.no_grad():
        logits = model(x)
        assert logits.shape == (1, 3, 37, 53) and model(torch.rand(1, 3, 1, 1)).shape == (1, 3, 1, 1)
        assert unet("DeepLabV3Plus")(x).shape == (1, 3, 37, 53)  # the default architecture (output stride 16)
        plain = model.model.predict_probabilities(x, [1.0], False)
        assert torch.equal(plain.argmax(1), logits.argmax(1))
        torch.testing.assert_close(plain, logits.softmax(1))

        flipped = model(x.flip(-1)).flip(-1)
        literal = (logits.softmax(1) + flipped.softmax(1)) / 2
        torch.testing.assert_close(model.model.predict_probabilities(x, [1.0], True), literal)

        half = model(F.interpolate(x, size=(18, 26), mode="bilinear", align_corners=False))  # round(0.5 * 37) = 18
        half = F.interpolate(half, size=(37, 53), mode="bilinear", align_corners=False)
        torch.testing.assert_close(model.model.predict_probabilities(x, [0.5, 1.0], False),
                                   (half.softmax(1) + logits.softmax(1)) / 2)


# ------------------------------------------------------------------ training
def test_fit_poly_schedule_logging_and_student_only_checkpoint(tmp_path):
    g = torch.Generator().manual_seed(0)
    masks = torch.randint(0, 3, (4, 32, 32), generator=g)
    masks[:, :8] = 255  # a quarter of every mask is ignored
    train = [{"image": torch.rand(3, 32, 32, generator=g), "mask": m, "confidence": torch.ones(32, 32), "id": str(i)}
             for i, m in enumerate(masks)]
    lrs: list[float] = []

    class RecordLR(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    model = pixelwise()
    t = trainer(tmp_path, max_steps=4, callbacks=[RecordLR()], limit_val_batches=0)
    t.fit(model, DataLoader(train, batch_size=2))
    assert lrs == pytest.approx([0.01 * (1 - k / 4) ** 0.9 for k in range(4)], rel=1e-9)
    assert isinstance(t.optimizers[0], torch.optim.SGD)
    assert t.optimizers[0].defaults["momentum"] == 0.9 and t.optimizers[0].defaults["weight_decay"] == 5e-4
    assert t.callback_metrics["train/ignored_fraction"].item() == pytest.approx(0.25)
    assert torch.isfinite(t.callback_metrics["train/loss"])

    t.save_checkpoint(tmp_path / "student.ckpt")
    ckpt = torch.load(tmp_path / "student.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["state_dict"] and all(k.startswith("model.") for k in ckpt["state_dict"])
    assert "model.mean" in ckpt["state_dict"]
    restored = SegmentationStudent.load_from_checkpoint(tmp_path / "student.ckpt", map_location="cpu")
    x = torch.rand(1, 3, 40, 40)
    torch.testing.assert_close(restored.eval()(x), model.eval()(x))
    assert all(k.startswith("model.net.") or k in ("model.mean", "model.std") for k in unet().state_dict())


def test_unbounded_schedule_is_a_clear_error(tmp_path):
    model = pixelwise()
    model.trainer = trainer(tmp_path, max_steps=-1, max_epochs=-1)
    with pytest.raises(ValueError, match="max_steps"):
        model.configure_optimizers()


def test_optimizer_from_yaml_style_config(tmp_path):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(SegmentationStudent, "model")
    base = {"num_classes": 3, "arch": "test-pixelwise", "encoder_weights": None}
    cfg = parser.parse_object({"model": {**base, "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.001}}}})
    model = parser.instantiate(cfg).model
    model.trainer = trainer(tmp_path, max_steps=10)
    out = model.configure_optimizers()
    assert isinstance(out["optimizer"], torch.optim.AdamW) and out["optimizer"].defaults["lr"] == 0.001
    assert out["lr_scheduler"]["interval"] == "step"

    default = parser.instantiate(parser.parse_object({"model": base})).model.optimizer_factory(model.parameters())
    assert isinstance(default, torch.optim.SGD) and default.defaults["momentum"] == 0.9


# ------------------------------------------------------------- evaluation
def fixed_eval_set() -> list[dict]:
    """Three images of different sizes; ground truth partly void, one image without ground truth."""
    rng = np.random.default_rng(0)
    items = []
    for i, (h, w) in enumerate([(40, 48), (33, 57), (32, 32)]):
        colours = rng.integers(0, 3, (h, w))
        gt = rng.integers(0, 3, (h, w))
        gt[: h // 3] = colours[: h // 3]  # partly right, so IoUs are neither 0 nor 1
        gt[rng.random((h, w)) < 0.2] = 255
        if i == 2:
            gt[:] = 255
        items.append({"id": f"img{i}", "image": colour_image(colours), "mask": torch.from_numpy(gt).long()})
    return items


def numpy_miou(preds: list[np.ndarray], gts: list[np.ndarray], n: int) -> tuple[np.ndarray, float]:
    conf = np.zeros((n, n), np.int64)
    for p, g in zip(preds, gts):
        keep = g != 255
        conf += np.bincount(n * g[keep] + p[keep], minlength=n * n).reshape(n, n)
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    return iou, float(np.nanmean(iou))


def test_validation_miou_equals_numpy_confusion_matrix(tmp_path):
    items = fixed_eval_set()
    model = pixelwise(class_names=["bg", "cat", "dog"])
    with torch.no_grad():  # a shuffled colour -> class map, so that every class is predicted somewhere
        model.model.net.weight.copy_(torch.eye(3)[[1, 2, 0]].view(3, 3, 1, 1) + 0.3 * torch.randn(3, 3, 1, 1))
    t = trainer(tmp_path, limit_val_batches=3)
    t.validate(model, eval_loader(items), verbose=False)
    with torch.no_grad():
        preds = [model(it["image"][None])[0].argmax(0).numpy() for it in items]
    iou, miou = numpy_miou(preds, [it["mask"].numpy() for it in items], 3)
    assert t.callback_metrics["val/mIoU"].item() == pytest.approx(miou, abs=1e-6)
    for name, value in zip(["bg", "cat", "dog"], iou):
        if not np.isnan(value):
            assert t.callback_metrics[f"val/IoU/{name}"].item() == pytest.approx(value, abs=1e-6)


def test_val_flip_uses_tta_in_validation(tmp_path):
    items = fixed_eval_set()[:1]
    model = unet(val_flip=True)
    t = trainer(tmp_path)
    t.validate(model, eval_loader(items), verbose=False)
    with torch.no_grad():
        preds = [model.model.predict_probabilities(it["image"][None], [1.0], True)[0].argmax(0).numpy() for it in items]
    assert t.callback_metrics["val/mIoU"].item() == pytest.approx(numpy_miou(preds, [it["mask"].numpy() for it in items], 3)[1], abs=1e-6)


def test_test_and_predict_write_voc_palette_pngs(tmp_path):
    labels = [np.array([[0, 1, 2, 2], [1, 1, 0, 2], [2, 0, 0, 1]]), np.tile([0, 1, 2], (5, 3))]
    items = [{"id": f"2007_00000{i}", "image": colour_image(lab), "mask": torch.from_numpy(lab).long()}
             for i, lab in enumerate(labels)]
    model = pixelwise(output_dir=str(tmp_path / "out"))
    t = trainer(tmp_path)
    t.test(model, eval_loader(items), verbose=False)
    assert t.callback_metrics["test/mIoU"].item() == pytest.approx(1.0)
    for i, lab in enumerate(labels):
        png = Image.open(tmp_path / "out" / "predictions" / f"2007_00000{i}.png")
        assert png.mode == "P" and png.getpalette()[:768] == voc_palette()[:768]
        np.testing.assert_array_equal(np.asarray(png), lab)

    no_gt = [{**it, "mask": torch.full_like(it["mask"], 255)} for it in items]
    model = pixelwise()  # default output: trainer.default_root_dir
    t = trainer(tmp_path / "run")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert t.predict(model, eval_loader(no_gt)) == [["2007_000000"], ["2007_000001"]]  # the ids it wrote
    assert not [w for w in caught if "predict returned None" in str(w.message)]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "run" / "predictions" / "2007_000001.png")), labels[1])
    t.test(model, eval_loader(no_gt), verbose=False)
    assert "test/mIoU" not in t.callback_metrics
    assert not list((tmp_path / "run" / "predictions").glob(".*.tmp"))  # atomic writes leave no temp files


def test_panels_go_to_image_loggers_only(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    tensorboard = TensorBoardLogger(tmp_path)  # writes through tensorboardX when tensorboard is absent
    pictures = []
    real_add_image = tensorboard.experiment.add_image

    def add_image(tag, image, step, dataformats):
        pictures.append((tag, image.shape, image.dtype, dataformats))
        real_add_image(tag, image, step, dataformats=dataformats)

    monkeypatch.setattr(tensorboard.experiment, "add_image", add_image)
    for logger in (tensorboard, CSVLogger(tmp_path)):
        t = L.Trainer(accelerator="cpu", logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path / "run")
        t.validate(pixelwise(num_panels=1), eval_loader(fixed_eval_set()), verbose=False)
    assert pictures == [("val/panels/img0", (40, 3 * 48 + 8, 3), np.uint8, "HWC")]
    # the CSV logger takes no pictures: they go to disk, under the run's folder (never the working directory)
    assert [p.name for p in (tmp_path / "run" / "val_panels").rglob("*.jpg")] == ["img0.jpg"]


def test_wandb_gets_panels_of_one_size(tmp_path, monkeypatch):
    """The eval set's images differ in size; W&B shows a list at its first picture's size, so all are padded."""
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(save_dir=tmp_path, offline=True)
    logged = []
    monkeypatch.setattr(logger, "log_image", lambda key, images, caption, step: logged.append((key, images, caption)))
    t = L.Trainer(accelerator="cpu", logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path / "run")
    try:
        t.validate(pixelwise(num_panels=3), eval_loader(fixed_eval_set()), verbose=False)
    finally:  # a run left open is reused by every later WandbLogger of this process (other tests)
        logger.experiment.finish()
    ((key, images, caption),) = logged
    assert key == "val/panels" and caption == ["img0", "img1", "img2"]
    assert {im.shape for im in images} == {(40, 3 * 57 + 8, 3)}  # the tallest and the widest of the three rows
    assert (images[2][32:] == 255).all()  # the 32x32 image's row, padded below


def test_multiscale_and_flip_evaluation_of_the_wsss_papers(tmp_path):
    """val_scales (0.5, 0.75, 1.0) + flip: the mean of six softmaxes, each from a resized (and flipped) image."""
    item = fixed_eval_set()[0]  # 40 x 48
    model = unet(val_scales=[0.5, 0.75, 1.0], val_flip=True)
    x = item["image"][None]
    with torch.no_grad():
        literal = torch.zeros(1, 3, 40, 48)
        for size in [(20, 24), (30, 36), (40, 48)]:  # round(0.5 * 40) = 20, round(0.75 * 48) = 36, …
            xs = F.interpolate(x, size=size, mode="bilinear", align_corners=False) if size != (40, 48) else x
            for flipped in (False, True):
                logits = model(xs.flip(-1)).flip(-1) if flipped else model(xs)
                literal += F.interpolate(logits, size=(40, 48), mode="bilinear", align_corners=False).softmax(1) / 6
        torch.testing.assert_close(model.model.predict_probabilities(x, [0.5, 0.75, 1.0], True), literal)
    t = trainer(tmp_path)
    t.validate(model, eval_loader([item]), verbose=False)
    expected = numpy_miou([literal[0].argmax(0).numpy()], [item["mask"].numpy()], 3)[1]
    assert t.callback_metrics["val/mIoU"].item() == pytest.approx(expected, abs=1e-6)


# ------------------------------------------------------------------ parameter groups / SyncBN
def test_deeplabv3plus_head_at_ten_times_the_lr_from_voc_yaml(tmp_path):
    from pathlib import Path

    import yaml
    from jsonargparse import ArgumentParser

    block = yaml.safe_load((Path(__file__).resolve().parents[1] / "experiments" / "voc.yaml").read_text())["model"]
    parser = ArgumentParser()
    parser.add_class_arguments(SegmentationStudent, "model")
    args = {**block["init_args"], "encoder_name": "resnet18", "encoder_weights": None, "num_classes": 3}
    model = parser.instantiate(parser.parse_object({"model": args})).model
    model.trainer = trainer(tmp_path, max_steps=10)
    out = model.configure_optimizers()
    opt, scheduler = out["optimizer"], out["lr_scheduler"]["scheduler"]
    groups = {g["name"]: g for g in opt.param_groups}
    assert list(groups) == ["backbone", "head"]
    assert groups["backbone"]["lr"] == pytest.approx(0.01) and groups["head"]["lr"] == pytest.approx(0.1)
    assert groups["backbone"]["weight_decay"] == groups["head"]["weight_decay"] == 5e-4
    net = model.model.net
    assert {id(p) for p in groups["backbone"]["params"]} == {id(p) for p in net.encoder.parameters()}
    head = [*net.decoder.parameters(), *net.segmentation_head.parameters()]
    assert {id(p) for p in groups["head"]["params"]} == {id(p) for p in head}
    for _ in range(5):
        opt.step()
        scheduler.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01 * 0.5 ** 0.9, 0.1 * 0.5 ** 0.9])


def test_group_settings_are_checked_at_construction():
    with pytest.raises(ValueError, match="head_bias_lr_mult"):
        pixelwise(head_bias_weight_decay=0.0)
    with pytest.raises(ValueError, match="head_lr_mult must be > 0"):
        pixelwise(head_lr_mult=0.0)


def test_sync_batchnorm_only_under_ddp(tmp_path):
    model = unet("DeepLabV3Plus", sync_batchnorm=True)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    params = {id(p) for p in model.parameters()}
    model.trainer = trainer(tmp_path)  # one process: nothing to synchronise
    model.setup("fit")
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    model.trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
                              enable_model_summary=False, default_root_dir=tmp_path)  # not launched: world size 2
    model.setup("fit")
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules()) == n_bn
    assert {id(p) for p in model.parameters()} == params  # same parameters, so the optimizer sees them
    assert all(k.startswith("model.") for k in model.state_dict())


# ------------------------------------------------------------------------------ evaluation CRF
def two_colour_case() -> tuple[dict, torch.Tensor]:
    """A 32 x 64 image, red left half (class 1) and blue right half (class 2), and a student's softmax that is
    wrong near the edge (its boundary 5 px too far right, as a coarse stride-8 map) and at 10% salt pixels."""
    image = torch.zeros(3, 32, 64)
    image[:, :, :32] = torch.tensor([200, 40, 40]).view(3, 1, 1) / 255
    image[:, :, 32:] = torch.tensor([40, 40, 200]).view(3, 1, 1) / 255
    gt = torch.ones(32, 64, dtype=torch.long)
    gt[:, 32:] = 2
    left = torch.sigmoid((37 - torch.arange(64.0)) / 2).expand(32, 64)  # P(class 1) along x, 0.5 at x = 37
    probs = torch.stack([torch.full((32, 64), 0.1), 0.9 * left, 0.9 * (1 - left)])
    salt = torch.rand(32, 64, generator=torch.Generator().manual_seed(0)) < 0.1
    ys, xs = salt.nonzero(as_tuple=True)
    probs[:, ys, xs] = 0.1
    probs[3 - gt[ys, xs], ys, xs] = 0.6  # the other colour's class
    probs[gt[ys, xs], ys, xs] = 0.3
    return {"id": "edge", "image": image, "mask": gt}, probs


def test_test_crf_cleans_a_noisy_prediction_along_the_colour_edge(tmp_path):
    item, probs = two_colour_case()
    raw_errors = int((probs.argmax(0) != item["mask"]).sum())
    assert raw_errors > 5 * 32  # the shifted edge alone costs 5 columns
    metrics = {}
    for crf in (False, True):
        model = SegmentationStudent(num_classes=3, arch="test-fixed", encoder_weights=None, test_crf=crf,
                                    output_dir=str(tmp_path / f"crf{crf}"))
        model.model.net.logits = probs.log()[None]
        t = trainer(tmp_path)
        t.validate(model, eval_loader([item]), verbose=False)
        metrics[crf] = t.callback_metrics["val/mIoU"].item()
        t.test(model, eval_loader([item]), verbose=False)
        png = np.asarray(Image.open(tmp_path / f"crf{crf}" / "predictions" / "edge.png"))
        np.testing.assert_array_equal(png, (item["mask"] if crf else probs.argmax(0)).numpy())
    assert metrics[True] == pytest.approx(1.0)  # every pixel right: classes 1 and 2, IoU 1 each
    raw_miou = numpy_miou([probs.argmax(0).numpy()], [item["mask"].numpy()], 3)[1]
    assert metrics[False] == pytest.approx(raw_miou, abs=1e-6) and raw_miou < 0.8

    from lightning.pytorch.trainer.states import TrainerFn

    model.trainer = t
    t.state.fn = TrainerFn.FITTING  # the validations inside fit stay without the CRF
    assert not model._crf_now()


def test_test_crf_without_the_package_fails_at_construction(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pydensecrf", None)  # import pydensecrf -> ImportError
    with pytest.raises(ImportError, match="pip install"):
        pixelwise(test_crf=True)
    pixelwise(test_crf=False)  # nothing needed without the CRF


def test_channels_last_changes_the_layout_not_the_numbers():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 45, 61)
    plain, nhwc = unet(), unet(channels_last=True)
    nhwc.load_state_dict(plain.state_dict())
    conv = next(m for m in nhwc.model.net.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(nhwc(images), plain(images), rtol=1e-4, atol=1e-4)


def test_panels_show_the_pseudo_label_the_datamodule_made_for_pictures(tmp_path):
    """image | ground truth | pseudo-label | prediction when the datamodule has a pseudo-label for the image."""
    pseudo = np.full((40, 48), 255, np.uint8)  # ignored pixels (cream), the top half class 1
    pseudo[:20] = 1

    class Data(L.LightningDataModule):
        panel_labels = {"img0": pseudo}

        def val_dataloader(self):
            return eval_loader(fixed_eval_set())

    t = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path / "run")
    t.validate(pixelwise(num_panels=2), datamodule=Data(), verbose=False)
    pictures = {p.stem: np.asarray(Image.open(p)).astype(int) for p in (tmp_path / "run" / "val_panels").rglob("*.jpg")}
    assert pictures["img0"].shape == (40, 4 * 48 + 12, 3)
    third = pictures["img0"][:, 2 * 52:2 * 52 + 48]  # tiles of 48 px with 4-px gaps
    assert np.abs(third - colour_mask(pseudo).astype(int)).mean() < 8  # JPEG-sized differences only
    assert pictures["img1"].shape == (33, 3 * 57 + 8, 3)  # no pseudo-label for that image: three tiles
