"""Quality floors in the toy world: pseudo-label mIoU per stage with the shipped toy CLIP, the paper's
ablations, the distance to random weights, and the student of the embedded default.

The floors sit a few points under what was measured (README, "What the embedded default's numbers
mean"); a change that lowers segmentation quality below them is a regression. Every figure
comes from ``CLIPESLabeler.validate`` (the labelling code that predict and fit's pass run too) on
the first ``IMAGES`` train images of the world (seed 0), which the toy CLIP never saw.
"""
from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import yaml
from PIL import Image

from lightning_clipes.cli import cli_main
from lightning_clipes.components.clip_loader import SHIPPED, shipped_weights
from lightning_clipes.data.labeler_datamodule import LabelerDataModule
from lightning_clipes.data.toy_world import ToyWorldSource
from lightning_clipes.labeler import CLIPESLabeler
from lightning_clipes.data.toy_captions import TOY_CLIP_NAME

REPO = Path(__file__).resolve().parents[1]
SYNTHETIC = REPO / "experiments" / "synthetic.yaml"
IMAGES = 100
# measured on this slice (README table): CAM 64.6, + CAA 59.1, + CRF 62.2; random weights 10.4 / 12.9 / 15.4;
# no background words 28.0 / 26.7 / 27.4; plain GradCAM 49.6 / 47.3 / 49.6. The floors never went down: the
# same CLIP with the softmax at its learned logit scale (19.5; softmax_logit_scale null, until 2026-12-03) measured 59.4 /
# 55.2 / 58.1 here (floors 56.5 / 52.0 / 55.0), the CLIP before it (trained without CaiT-style class attention
# and object crops) 43.7 / 36.9 / 37.5 (floors 40.5 / 34.0 / 36.0), the 300-step one before that 37.5 / 36.8 /
# 38.7 (CAM floor 34.5).
FLOORS = {"cam": 61.5, "caa": 56.0, "crf": 59.0}
pytestmark = pytest.mark.slow


def labeler_settings() -> dict:
    """The embedded default's labeler, as experiments/synthetic.yaml sets it."""
    return yaml.safe_load(SYNTHETIC.read_text())["data"]["init_args"]["labeler"]["init_args"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("toy") / "VOC2012"
    ToyWorldSource(root, num_train=IMAGES, num_val=0, num_test=0).prepare()
    return root


def pseudo_miou(world: Path, **overrides) -> dict:
    """pseudo/mIoU per stage (percent) of the embedded default's labeler with ``overrides``."""
    L.seed_everything(0)
    labeler = CLIPESLabeler(**{**labeler_settings(), "crf_workers": 0, **overrides})
    dm = LabelerDataModule(ToyWorldSource(world, num_train=IMAGES, num_val=0, num_test=0), "train", batch_size=16,
                           num_workers=0)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, inference_mode=False)
    metrics = trainer.validate(labeler, datamodule=dm, verbose=False)[0]
    return {k.split("_")[-1]: 100 * v for k, v in metrics.items() if k.startswith("pseudo/mIoU_")}


@pytest.fixture(scope="module")
def trained(world) -> dict:
    return pseudo_miou(world)


def test_the_embedded_default_uses_the_shipped_toy_clip():
    settings = labeler_settings()
    assert settings["model_name"] == TOY_CLIP_NAME and settings["pretrained"] == SHIPPED
    assert shipped_weights(TOY_CLIP_NAME).stat().st_size < 8 * 2**20  # a few MB in the package


def test_pseudo_label_floors(trained):
    """Not asserted, because not yet true of the shipped toy CLIP: the paper's CAM < + CAA (issue #10)."""
    for stage, floor in FLOORS.items():
        assert trained[stage] >= floor, (stage, trained)
    assert trained["crf"] > trained["caa"], trained  # the CRF sharpens the CAA maps' edges


def test_trained_clip_is_far_above_chance(world, trained):
    chance = pseudo_miou(world, pretrained=None)
    assert max(chance.values()) < 18, chance  # measured 10.4 / 12.9 / 15.4: the CRF alone finds some objects
    for stage in ("cam", "caa", "crf"):
        assert trained[stage] >= chance[stage] + 15, (stage, trained, chance)


def test_background_words_and_the_softmax_both_matter(world, trained):
    """The paper's two ablations (its Table 4 and 5): each loses points (measured at + CAA: 32.4 and 11.8)."""
    no_background = pseudo_miou(world, background="none")
    plain = pseudo_miou(world, gradcam="plain")
    assert no_background["caa"] < trained["caa"] - 25, (no_background, trained)
    assert plain["caa"] < trained["caa"] - 8, (plain, trained)


def test_select_prompt_ranks_the_captions_phrasing_above_nonsense(world, tmp_path):
    from lightning_clipes.prompt_selection import main as select_prompt

    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {}.\nand , on {} on , and.\n")
    rows = select_prompt(["-c", str(SYNTHETIC), "--data.root", str(world), "--data.num_train", str(IMAGES),
                          "--data.num_val", "0", "--templates", str(templates), "--max_images", str(IMAGES)])
    assert [r["template"] for r in rows] == ["a photo of a {}.", "and , on {} on , and."], rows


def test_student_of_the_embedded_default_learns_from_the_masks(tmp_path):
    """The main job as the README runs it (500 steps, 100 val scenes, seed 0): measured val/mIoU 0.642 (seeds
    1 / 2: 0.699 / 0.700), where its masks score 0.679; an all-background guess scores about 0.08. One seed's
    figure moves with the student's random numbers by about ±0.05. Until the labeler's softmax ran at logit scale 1
    (softmax_logit_scale) this test ran 300 steps on 50 val scenes (floor 0.55, measured 0.587; seeds 1 / 2: 0.665 / 0.620);
    the masks at scale 1 give 0.540 / 0.681 / 0.579 there (mean 0.600 against 0.624) and 0.642 / 0.699 /
    0.700 at 500 steps (mean 0.680 against 0.618 / 0.705 / 0.675, 0.666): the student's changes are within its
    seeds' spread both ways, so the test now runs the length the README reports. Earlier floors: the resnet18
    student from random weights 0.532 at 300 steps (floor 0.50), with the CLIP shipped before 0.338 (floor 0.32),
    with the 300-step one before it 0.295 (floor 0.26)."""
    cli = cli_main(["fit", "-c", str(SYNTHETIC), "--data.root", str(tmp_path / "VOC2012"),
                    "--data.store_dir", str(tmp_path / "store"), "--trainer.default_root_dir", str(tmp_path / "run"),
                    "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"])
    assert float(cli.trainer.callback_metrics["val/mIoU"]) >= 0.60
    # the pictures: image | ground truth | pseudo-label | prediction, 128-px tiles with 4-px gaps
    widths = {Image.open(p).size[0] for p in (tmp_path / "run" / "val_panels").rglob("*.jpg")}
    assert widths == {4 * 128 + 12}
