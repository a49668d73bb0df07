"""The toy student's encoder pretraining: inputs reach the encoder in the student's statistics, training
lowers the loss, the export loads into a student through init_checkpoint (and ``shipped``), and the
embedded default starts from the shipped file."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from lightning_clipes import SegmentationStudent
from lightning_clipes.components.provenance import training_environment
from lightning_clipes.components.student_factory import shipped_encoder
from lightning_clipes.data.toy_captions import ToyCaptionDataModule
from lightning_clipes.toy_encoder import ToyEncoder

REPO = Path(__file__).resolve().parents[1]
ENCODER = "tu-regnetx_002"  # the embedded default's: 2.3 M parameters, fast on a CPU


def test_prepare_gives_the_student_normalisation_of_the_stream_image():
    module = ToyEncoder(encoder_name=ENCODER, image_size=8)
    rgb = torch.rand(2, 3, 8, 8)  # in [0, 1], already at image_size: no resize
    clip_in = (rgb - torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    imagenet_mean, imagenet_std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    expected = (rgb - imagenet_mean.view(1, 3, 1, 1)) / imagenet_std.view(1, 3, 1, 1)
    torch.testing.assert_close(module.prepare(clip_in, flip=False), expected, atol=1e-5, rtol=1e-5)
    flipped = module.prepare(clip_in, flip=True)  # each image either as it is or mirrored
    for got, want in zip(flipped, expected):
        assert torch.allclose(got, want, atol=1e-5) or torch.allclose(got, want.flip(-1), atol=1e-5)
    assert module.prepare(torch.zeros(1, 3, 16, 16), flip=False).shape == (1, 3, 8, 8)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A ToyEncoder fitted for 15 steps on one batch of 16 scenes at 64 px, exported; losses before/after."""
    tmp = tmp_path_factory.mktemp("toy_encoder")
    L.seed_everything(0)
    dm = ToyCaptionDataModule(image_size=64, num_samples=16, val_samples=16, batch_size=16, p_crop=0.5)
    dm.setup("fit")
    module = ToyEncoder(encoder_name=ENCODER, image_size=64, lr=3e-3, warmup_steps=1, export_path=str(tmp / "enc.pt"))
    images, _, present = next(iter(dm.train_dataloader()))

    def loss() -> float:
        module.eval()
        with torch.no_grad():
            out = torch.nn.functional.binary_cross_entropy_with_logits(module(module.prepare(images, False)), present.float())
        module.train()
        return float(out)

    before = loss()
    L.Trainer(accelerator="cpu", devices=1, max_steps=15, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
              default_root_dir=tmp).fit(module, datamodule=dm)
    return module, tmp / "enc.pt", before, loss()


def test_training_lowers_the_classification_loss(exported):
    _, _, before, after = exported
    assert after < 0.5 * before, (before, after)


def test_export_loads_into_a_student_encoder_and_leaves_the_decoder_fresh(exported):
    module, path, _, _ = exported
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["trained_with"]["torch"] == training_environment()["torch"]
    state = ckpt["state_dict"]
    assert all(k.startswith("encoder.") for k in state)
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float16}
    L.seed_everything(1)
    fresh = SegmentationStudent(num_classes=11, arch="Unet", encoder_name=ENCODER, encoder_weights=None)
    L.seed_everything(1)
    student = SegmentationStudent(num_classes=11, arch="Unet", encoder_name=ENCODER, encoder_weights=None,
                                  init_checkpoint=str(path), init_exclude=["decoder", "segmentation_head"])
    loaded, own = student.model.net.encoder.state_dict(), fresh.model.net.encoder.state_dict()
    for k, v in module.encoder.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(loaded[k], v.half().float())
    changed = [k for k in own if own[k].is_floating_point() and not torch.equal(loaded[k], own[k])]
    assert len(changed) > 0.9 * sum(v.is_floating_point() for v in own.values())  # not the fresh init
    for k, v in fresh.model.net.decoder.state_dict().items():
        assert torch.equal(student.model.net.decoder.state_dict()[k], v)
    with pytest.raises(ValueError, match="missing from the checkpoint"):  # the decoder must be excluded explicitly
        SegmentationStudent(num_classes=11, arch="Unet", encoder_name=ENCODER, encoder_weights=None,
                            init_checkpoint=str(path))


def test_shipped_names_the_package_file_or_tells_how_to_make_one():
    assert Path(shipped_encoder(ENCODER)).is_file()
    with pytest.raises(FileNotFoundError, match="toy_encoder.yaml"):
        shipped_encoder("resnet34")


def test_the_embedded_default_starts_from_the_shipped_encoder():
    model = yaml.safe_load((REPO / "experiments" / "synthetic.yaml").read_text())["model"]["init_args"]
    recipe = yaml.safe_load((REPO / "experiments" / "toy_encoder.yaml").read_text())["model"]["init_args"]
    assert model["init_checkpoint"] == "shipped" and model["encoder_weights"] is None
    assert model["encoder_name"] == recipe["encoder_name"] and recipe["export_path"].endswith(f"encoders/{ENCODER}.pt")
    student = SegmentationStudent(num_classes=11, arch=model["arch"], encoder_name=model["encoder_name"],
                                  encoder_weights=None, init_checkpoint="shipped", init_exclude=model["init_exclude"])
    shipped = torch.load(shipped_encoder(ENCODER), weights_only=True)
    for k, v in student.model.net.state_dict().items():
        if k in shipped and v.is_floating_point():
            torch.testing.assert_close(v, shipped[k].float())
