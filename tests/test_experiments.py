"""Every config in experiments/ runs one batch on tiny settings (lightning-hydra-template's test_sweeps)."""
from pathlib import Path

import pytest
import yaml

from lightning_clipes.cli import cli_main

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
# whole-run configs (a model and data); files such as trainer_default.yaml are pieces they include
CONFIGS = sorted(p for p in EXPERIMENTS.glob("*.yaml") if "model" in (yaml.safe_load(p.read_text()) or {}))


def is_labeler(config: Path) -> bool:
    return yaml.safe_load(config.read_text())["model"]["class_path"].endswith("CLIPESLabeler")


def data_overrides(config: Path, voc: Path, tmp_path: Path) -> list[str]:
    """Point a config's data at a tiny synthetic dataset of the same format."""
    source = str(yaml.safe_load(config.read_text())["data"])
    if "COCOSource" in source:
        from lightning_clipes.data.coco_format import write_synthetic_coco

        return ["--data.source.root", str(write_synthetic_coco(tmp_path / "coco", num_train=4, num_val=2))]
    if "FolderSource" in source:
        from lightning_clipes.data.folder_format import write_example_folder

        images, labels, classes = write_example_folder(tmp_path / "folder")
        return ["--data.source.image_dir", str(images), "--data.source.label_file", str(labels),
                "--data.source.classes", str(classes), "--data.source.mask_dir", str(tmp_path / "folder" / "masks"),
                "--data.labeler.init_args.class_names", str(classes), "--data.split", "train", "--data.val_split", "val"]
    if "ToyWorldSource" in source:  # the labeler alone on a few scenes of the toy world
        return ["--data.source.init_args.root", str(tmp_path / "toy" / "VOC2012"),
                "--data.source.init_args.num_train", "4", "--data.source.init_args.num_val", "2"]
    if "ToyWorld" in source:  # a few scenes of the toy world, labelled by the shipped toy CLIP
        return ["--data.root", str(tmp_path / "toy" / "VOC2012"), "--data.num_train", "4", "--data.num_val", "2"]
    return ["--data.root", str(voc), "--data.split", "train"] + ([] if is_labeler(config) else ["--data.val_split", "val"])


def tiny_overrides(config: Path, voc: Path, ckpt: Path, out: Path) -> list[str]:
    if "ToyCaptionDataModule" in config.read_text():  # trains the toy CLIP: tiny batches, nothing exported
        return ["--trainer.default_root_dir", str(out), "--trainer.fast_dev_run", "1", "--trainer.logger", "false",
                "--data.batch_size", "4", "--data.val_samples", "4", "--data.image_size", "64",
                "--model.export_path", "null"]
    common = ["--trainer.default_root_dir", str(out), "--trainer.accelerator", "cpu",
              "--trainer.devices", "1", "--trainer.fast_dev_run", "1", *data_overrides(config, voc, out)]
    cfg = yaml.safe_load(config.read_text())
    data = str(cfg["data"])
    if is_labeler(config):  # the toy world keeps its shipped toy CLIP; other data get the tiny random one
        weights = [] if "ToyWorld" in data else ["--model.pretrained", str(ckpt)]
        return common + ["--trainer.logger", "false", "--data.num_workers", "0", *weights, "--model.affinity_layers", "2"]
    common += ["--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", str(out)]  # W&B stays out of tests
    if "labeler" in data and "ToyWorld" not in data:
        common += ["--data.labeler.init_args.pretrained", str(ckpt), "--data.labeler.init_args.affinity_layers", "2"]
    model = cfg["model"].get("init_args", {})
    # a config that starts from shipped weights keeps its encoder (the file fits only that one)
    encoder = [] if model.get("init_checkpoint") else ["--model.encoder_name", "resnet18", "--model.encoder_weights", "null"]
    return common + ["--data.store_dir", str(out / "store"), "--data.num_workers", "0", "--data.crop_size", "32",
                     "--data.batch_size", "2", *encoder]


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_config_runs_one_batch(config, synthetic_voc, tiny_openai_ckpt, tmp_path):
    stages = ["predict", "validate"] if is_labeler(config) else ["fit"]
    for stage in stages:
        cli_main([stage, "-c", str(config), *tiny_overrides(config, synthetic_voc, tiny_openai_ckpt, tmp_path / stage)])


def test_configs_stack_on_the_base(capsys):
    with pytest.raises(SystemExit) as done:
        cli_main(["fit", "-c", str(EXPERIMENTS / "base.yaml"), "-c", str(EXPERIMENTS / "voc.yaml"),
                  "--trainer.max_steps", "7", "--print_config"])
    assert done.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["max_steps"] == 7 and printed["trainer"]["val_check_interval"] == 2000
    assert printed["model"]["class_path"].endswith("SegmentationStudent")
    assert printed["data"]["init_args"]["labeler"]["class_path"].endswith("CLIPESLabeler")


@pytest.mark.slow
def test_both_synthetic_configs_run_at_once_without_touching_each_others_files(tmp_path):
    """The README's two embedded-default commands, started together from one folder."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONWARNINGS": "ignore", "WANDB_MODE": "offline"}
    quiet = ["--trainer.enable_progress_bar", "false"]
    fit = [sys.executable, "-m", "lightning_clipes.cli", "fit", "-c", str(EXPERIMENTS / "synthetic.yaml"),
           "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", *quiet]
    predict = [sys.executable, "-m", "lightning_clipes.cli", "predict", "-c",  # 16 of its 400 scenes, to be quick
               str(EXPERIMENTS / "synthetic_pseudo_labels.yaml"), "--data.source.init_args.num_train", "16", *quiet]
    runs = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for cmd in (fit, predict)]
    for run in runs:
        out, _ = run.communicate(timeout=600)
        assert run.returncode == 0, out[-3000:]
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["synthetic", "synthetic_pseudo_labels"]
    fit_ids = read_ids(tmp_path / "outputs" / "synthetic" / "VOC2012")
    predict_ids = read_ids(tmp_path / "outputs" / "synthetic_pseudo_labels" / "VOC2012")
    assert fit_ids and predict_ids
    store = tmp_path / "outputs" / "synthetic_pseudo_labels" / "pseudo_labels"
    assert sorted(p.stem for p in (store / "masks").glob("*.png")) == predict_ids["train"]


def read_ids(root: Path) -> dict:
    return {split.stem: split.read_text().split() for split in (root / "ImageSets" / "Segmentation").glob("*.txt")}
