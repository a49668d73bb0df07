"""The whole method as one job: labelling pass + student, on CPU (issue #3)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_clipes.cli import cli_main
from lightning_clipes.data.synthetic import write_synthetic_voc
from lightning_clipes.data.voc_format import read_split

REPO = Path(__file__).resolve().parents[1]
SYNTHETIC = str(REPO / "experiments" / "synthetic.yaml")


def test_student_learns_from_ground_truth_masks(tmp_path):
    """Plumbing: with ground truth standing in for pseudo-labels, a small U-Net reaches val mIoU >= 0.8,
    so augmentation, class indices, the ignore index and the metric fit together."""
    voc = write_synthetic_voc(tmp_path / "VOC2012", num_train=48, num_val=8, seed=3)
    cli = cli_main([
        "fit", "-c", SYNTHETIC, "--data.class_path", "lightning_clipes.VOCSegmentationDataModule",
        "--data.init_args.root", str(voc), "--data.init_args.split", "train", "--data.init_args.val_split", "val",
        "--data.init_args.labeler", "null", "--data.init_args.crop_size", "64", "--data.init_args.batch_size", "8",
        "--data.init_args.num_workers", "0", "--data.init_args.scale_range", "[0.75, 1.25]",
        "--trainer.max_steps", "240", "--trainer.val_check_interval", "240", "--trainer.logger", "false",
        "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.enable_progress_bar", "false",
    ])
    assert float(cli.trainer.callback_metrics["val/mIoU"]) >= 0.8
    assert len(list((tmp_path / "run" / "val_panels").rglob("*.jpg"))) == 4  # pictures without a logger


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_splits_the_labelling_and_trains(tmp_path):
    run = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "lightning_clipes.cli", "fit", "-c", SYNTHETIC,
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
        "--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(run), "--trainer.logger.init_args.save_dir", str(run),
        "--data.root", str(tmp_path / "VOC2012"), "--data.store_dir", str(tmp_path / "store"), "--data.num_train", "10",
        "--data.batch_size", "2", "--trainer.log_every_n_steps", "1",
    ]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, timeout=900, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    console = done.stdout + done.stderr
    # warnings the project can avoid (issue #12), printed by either rank
    avoidable = ["sync_dist", "is not writable", "args parameter is intended", "does not have many workers",
                 "lightning/pytorch/cli.py"]
    assert not [line for line in console.splitlines() if any(a in line for a in avoidable)]
    ours = [line for line in console.splitlines() if "lightning_clipes/" in line and "Warning" in line]
    assert len(ours) <= 2, ours  # only the random-CLIP warning, once per rank
    ids = read_split(tmp_path / "VOC2012", "train")
    (store,) = [p for p in (tmp_path / "store").iterdir() if p.is_dir()]
    (done,) = [p for p in (store / "passes").iterdir() if p.is_dir()]  # one pass, one log per rank
    ranks = [json.loads((done / f"rank{r}_of2.json").read_text())["labelled"] for r in range(2)]
    assert ranks[0] and ranks[1] and not set(ranks[0]) & set(ranks[1])
    assert sorted(ranks[0] + ranks[1]) == sorted(ids)
    assert sorted(p.stem for p in (store / "masks").glob("*.png")) == sorted(ids)
    metrics = next(run.rglob("metrics.csv")).read_text()
    assert "val/mIoU" in metrics and "train/loss" in metrics
    ckpt = torch.load(next(run.rglob("last.ckpt")), map_location="cpu", weights_only=False)
    assert not any("clip" in k for k in ckpt["state_dict"])  # the student only


def test_resumed_fit_continues_from_the_checkpoint(tmp_path):
    common = [
        "-c", SYNTHETIC, "--data.root", str(tmp_path / "VOC2012"), "--data.store_dir", str(tmp_path / "store"),
        "--data.num_train", "6", "--data.num_val", "2", "--trainer.default_root_dir", str(tmp_path / "run"),
        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.val_check_interval", "2",
    ]
    cli_main(["fit", *common, "--trainer.max_steps", "2"])
    (last,) = list((tmp_path / "run").rglob("last.ckpt"))
    cli = cli_main(["fit", *common, "--trainer.max_steps", "4", "--ckpt_path", str(last)])
    assert cli.trainer.global_step == 4


def test_config_typo_fails_before_the_labelling_pass(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", "-c", SYNTHETIC, "--data.root", str(tmp_path / "VOC2012"), "--data.confidense_threshold", "0.9"])
    assert "confidense_threshold" in capsys.readouterr().err
    assert not (tmp_path / "VOC2012").exists()


def test_wandb_goes_offline_without_a_key_and_does_not_hang(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    cli_main([
        "fit", "-c", SYNTHETIC, "--data.root", str(tmp_path / "VOC2012"), "--data.store_dir", str(tmp_path / "store"),
        "--data.num_train", "4", "--data.num_val", "1", "--trainer.max_steps", "1", "--trainer.val_check_interval", "1",
        "--trainer.logger", "WandbLogger", "--trainer.logger.save_dir", str(tmp_path / "wb"),
        "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.enable_progress_bar", "false",
    ])
    assert os.environ["WANDB_MODE"] == "offline"
    assert list((tmp_path / "wb").rglob("offline-run-*"))


def test_a_console_run_shows_val_miou_and_ends_with_a_summary(tmp_path):
    """What a newcomer sees (issue #12): val/mIoU in the progress bar, then where everything went."""
    cmd = [sys.executable, "-m", "lightning_clipes.cli", "fit", "-c", SYNTHETIC, "--trainer.max_steps", "4",
           "--trainer.val_check_interval", "2", "--data.num_train", "8", "--data.num_val", "2"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stderr[-3000:]
    console = done.stdout + done.stderr
    assert "val/mIoU=" in console  # the progress bar's metrics
    summary = console[console.index("Done: 4 steps."):]
    assert "best val/mIoU" in summary and "last checkpoint: outputs/synthetic/" in summary
    assert "pseudo-labels: outputs/synthetic/pseudo_labels/" in summary and "config: outputs/synthetic/" in summary
    assert (tmp_path / summary.split("last checkpoint: ")[1].split()[0]).is_file()
