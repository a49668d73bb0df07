"""The first hour of a new user (issue #12): one clear line per bad path or flag, checked before CLIP
loads; null weights from the command line; select-prompt in --help; no needless warnings; the run's
config kept with its checkpoints."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from lightning.pytorch.demos.boring_classes import BoringModel

from lightning_clipes import cli
from lightning_clipes.cli import main

REPO = Path(__file__).resolve().parents[1]
VOC_FIT = str(REPO / "experiments" / "voc.yaml")
VOC_PREDICT = str(REPO / "experiments" / "voc_pseudo_labels.yaml")


@pytest.fixture(autouse=True)
def console_argv(monkeypatch):
    """As from the console: LightningCLI warns when it gets args= while sys.argv holds pytest's own."""
    monkeypatch.setattr(sys, "argv", ["clipes"])


@pytest.fixture
def no_clip(monkeypatch):
    """Fails the test if anything builds a CLIP: the checks must come first."""
    import lightning_clipes.labeler  # noqa: F401 - imported first, else it would bind the stand-in for good
    from lightning_clipes.components import clip_loader

    def refuse(*args, **kwargs):
        raise AssertionError("CLIP was loaded before the configuration was checked")

    monkeypatch.setattr(clip_loader, "load_clip", refuse)
    monkeypatch.setattr("lightning_clipes.labeler.load_clip", refuse)


def error_of(args, capsys) -> str:
    with pytest.raises(SystemExit) as done:
        main(args)
    assert done.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 2 and err[1] == "(run with --debug for the traceback)", err
    assert err[0].startswith("clipes: error: ")
    return err[0]


def test_missing_voc_root_is_one_line_before_clip_loads(no_clip, tmp_path, capsys):
    line = error_of(["fit", "-c", VOC_FIT, "--data.root", str(tmp_path / "nowhere")], capsys)
    assert "No JPEGImages/ folder" in line and "--data.root" in line and str(tmp_path / "nowhere") in line


def test_missing_split_names_the_splits_there(no_clip, synthetic_voc, capsys):
    line = error_of(["fit", "-c", VOC_FIT, "--data.root", str(synthetic_voc)], capsys)  # train_aug is not there
    assert "train_aug.txt" in line and "train, val" in line


def test_missing_weights_name_the_flag_of_the_subcommand(no_clip, synthetic_voc, capsys):
    line = error_of(["predict", "-c", VOC_PREDICT, "--data.root", str(synthetic_voc), "--model.pretrained", "w/ViT-B-16.pt"], capsys)
    assert "w/ViT-B-16.pt not found" in line and "--model.pretrained" in line
    line = error_of(["fit", "-c", VOC_FIT, "--data.root", str(synthetic_voc), "--data.split", "train",
                     "--data.labeler.init_args.pretrained", "w/ViT-B-16.pt"], capsys)
    assert "--data.labeler.init_args.pretrained" in line and "--model.pretrained" not in line
    line = error_of(["predict", "-c", VOC_PREDICT, "--data.root", str(synthetic_voc), "--model.pretrained", "laion9b"], capsys)
    assert "'laion9b' is neither a file nor a pretrained tag of ViT-B-16" in line and "openai" in line
    line = error_of(["predict", "-c", VOC_PREDICT, "--data.root", str(synthetic_voc), "--model.pretrained", "shipped"], capsys)
    assert "--model.pretrained shipped" in line and "ships no weights for 'ViT-B-16' (it has: clipes-toy-ViT)" in line


def test_downloads_that_cannot_happen_are_reported_at_once(no_clip, synthetic_voc, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = error_of(["fit", "-c", VOC_FIT, "--data.root", str(synthetic_voc), "--data.split", "train",
                     "--data.labeler.init_args.pretrained", "null"], capsys)
    assert "'imagenet' weights of encoder 'resnet101'" in line and "--model.encoder_weights null" in line


def test_missing_checkpoint_and_constructor_errors_are_one_line(synthetic_voc, tiny_openai_ckpt, tmp_path, capsys):
    line = error_of(["validate", "-c", VOC_PREDICT, "--data.root", str(synthetic_voc), "--model.pretrained",
                     str(tiny_openai_ckpt), "--ckpt_path", str(tmp_path / "gone.ckpt")], capsys)
    assert "gone.ckpt not found" in line and "--ckpt_path" in line
    line = error_of(["predict", "-c", VOC_PREDICT, "--data.root", str(synthetic_voc), "--model.pretrained",
                     str(tiny_openai_ckpt), "--model.affinity_layers", "2", "--model.templates", "[no placeholder]"], capsys)
    assert "exactly one '{}'" in line  # raised in CLIPESLabeler.__init__, without jsonargparse's 80-line report


def test_debug_shows_the_traceback(no_clip, tmp_path, monkeypatch):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    with pytest.raises(cli.ConfigError, match="JPEGImages") as raised:
        main(["fit", "-c", VOC_FIT, "--data.root", str(tmp_path / "nowhere"), "--debug"])
    assert isinstance(raised.value.__cause__, FileNotFoundError)  # the whole chain, as raised
    assert os.environ[cli.DEBUG_ENV] == "1"  # inherited by the processes a DDP launcher starts


def test_null_weights_work_on_the_command_line_of_fit(synthetic_voc, tmp_path):
    from lightning_clipes.cli import cli_main

    run = cli_main(["fit", "-c", VOC_FIT, "--data.root", str(synthetic_voc), "--data.split", "train",
                    "--data.val_split", "val", "--data.labeler.init_args.pretrained", "null",
                    "--data.labeler.init_args.model_name", "clipes-tiny-ViT", "--data.labeler.init_args.affinity_layers", "2",
                    "--data.labeler.init_args.crf", "false", "--data.store_dir", str(tmp_path / "store"),
                    "--data.num_workers", "0", "--data.crop_size", "32", "--data.batch_size", "2",
                    "--model.encoder_name", "resnet18", "--model.encoder_weights", "null", "--trainer.fast_dev_run", "1",
                    "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.logger", "CSVLogger",
                    "--trainer.logger.save_dir", str(tmp_path / "run"), "--trainer.default_root_dir", str(tmp_path / "run")])
    assert run.datamodule.labeler.settings["pretrained"] is None  # random weights, not the string 'None'


def test_help_lists_select_prompt(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "select-prompt" in capsys.readouterr().out


def test_console_command_does_not_warn_about_args(tmp_path):
    exe = Path(sys.executable).parent / "clipes"
    if not exe.exists():
        pytest.skip("clipes console script not installed (pip install -e .)")
    done = subprocess.run([str(exe), "fit", "-c", VOC_FIT, "--print_config"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "args parameter is intended" not in done.stderr


def test_each_run_keeps_its_config_with_its_checkpoints(synthetic_voc, tmp_path, monkeypatch, recwarn):
    """With W&B, every run wrote outputs/config.yaml; each must keep its own beside its checkpoints, None values
    included, without a warning from jsonargparse about the option that keeps them."""
    from lightning_clipes.cli import cli_main

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    import wandb

    runs = []
    for lr in ("0.01", "0.02"):
        wandb.finish()  # a second logger in one process would join the first run; a sweep starts one process per run
        run = cli_main(["fit", "-c", VOC_FIT, "--data.root", str(synthetic_voc), "--data.split", "train",
                        "--data.val_split", "val", "--data.labeler", "null", "--data.num_workers", "0",
                        "--data.crop_size", "32", "--data.batch_size", "2", "--model.encoder_name", "resnet18",
                        "--model.encoder_weights", "null", "--model.optimizer.init_args.lr", lr,
                        "--trainer.max_steps", "1", "--trainer.val_check_interval", "1", "--trainer.limit_val_batches", "1",
                        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.enable_progress_bar", "false",
                        "--trainer.logger.init_args.save_dir", str(tmp_path / "outputs"),
                        "--trainer.default_root_dir", str(tmp_path / "outputs")])
        runs.append(Path(run.trainer.checkpoint_callback.dirpath).parent)
    wandb.finish()  # leave no run open for the tests that follow
    assert runs[0] != runs[1] and not (tmp_path / "outputs" / "config.yaml").exists()
    configs = [yaml.safe_load((r / "config.yaml").read_text()) for r in runs]
    assert [c["model"]["init_args"]["optimizer"]["init_args"]["lr"] for c in configs] == [0.01, 0.02]
    assert all("labeler" in c["data"]["init_args"] and c["data"]["init_args"]["labeler"] is None for c in configs)
    ours = [w for w in recwarn if "skip_none" in str(w.message) and w.filename.endswith(str(Path("lightning_clipes", "cli.py")))]
    assert not ours, "jsonargparse >= 4.49 calls it skip_unset"  # Lightning's own dump still says skip_none


class FailsInPredict(BoringModel):
    def predict_step(self, batch, batch_idx):
        raise RuntimeError("predict_step failed on purpose")


def test_a_failed_run_closes_its_progress_bar(tmp_path):
    """Lightning closes its bars only when a stage ends; a failed run's bar was left to the garbage collector,
    whose write to stderr (through W&B's console capture, Python 3.11) broke every later parse in the process."""
    from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
    from tqdm import tqdm

    before = set(tqdm._instances)
    with pytest.raises(RuntimeError, match="on purpose"):
        main(["predict", "--model", f"{__name__}.FailsInPredict",
              "--data", "lightning.pytorch.demos.boring_classes.BoringDataModule",
              "--trainer.accelerator", "cpu", "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path)])
    left_open = [bar for bar in set(tqdm._instances) - before if isinstance(bar, Tqdm)]
    assert not left_open, [bar.desc for bar in left_open]


def test_the_suite_fails_a_test_whose_garbage_writes_a_context_variable(tmp_path):
    """conftest's guard against the failure above, on a hand-made finalizer; in a separate pytest run."""
    import shutil

    shutil.copy(REPO / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_leak.py").write_text(
        "import contextvars, gc\n"
        "VAR = contextvars.ContextVar('probe')\n"
        "class Leaky:\n"
        "    def __del__(self):\n"
        "        VAR.set(1)\n"
        "def test_leaks():\n"
        "    leaky = Leaky()\n"
        "    leaky.cycle = leaky\n"
        "    del leaky\n"
        "    gc.collect()\n"
        "def test_clean():\n"
        "    VAR.set(2)\n")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert "2 passed, 1 error" in done.stdout, done.stdout[-3000:]  # test_leaks fails at teardown, test_clean passes
    assert "ERROR test_leak.py::test_leaks" in done.stdout and "in __del__" in done.stdout


class _Parsed(Exception):
    def __init__(self, config):
        self.config = config


def test_command_line_settings_win_over_the_checkpoints_hyperparameters(tmp_path, monkeypatch):
    """Lightning merges a checkpoint's hyperparameters over the command line (`clipes test --ckpt_path BEST.ckpt
    --model.val_flip true` ran without flips); ours keep what the command line names and take the rest from
    the checkpoint."""
    import torch

    ckpt = tmp_path / "best.ckpt"
    torch.save({"hyper_parameters": {"_class_path": "lightning_clipes.SegmentationStudent", "num_classes": 3,
                                     "arch": "FPN", "encoder_name": "resnet18", "encoder_weights": None,
                                     "val_flip": False, "val_scales": [1.0]}}, ckpt)

    def stop(self):
        raise _Parsed(self.config[self.subcommand])

    monkeypatch.setattr(cli.CLIPESCLI, "before_instantiate_classes", stop)
    with pytest.raises(_Parsed) as parsed:
        cli.cli_main(["validate", "--model", "lightning_clipes.SegmentationStudent", "--model.num_classes", "3",
                      "--model.val_flip", "true", "--model.init_args.val_scales=[0.75, 1.25]",
                      "--data", "lightning_clipes.ToyWorldDataModule", "--ckpt_path", str(ckpt)])
    model = parsed.value.config.model.init_args
    assert model.val_flip is True and list(model.val_scales) == [0.75, 1.25]  # named on the command line
    assert model.arch == "FPN" and model.encoder_name == "resnet18"  # from the checkpoint, not the defaults


def test_command_line_model_keys():
    argv = ["validate", "-c", "x.yaml", "--model.val_flip", "true", "--model.init_args.val_scales=[1]",
            "--model.optimizer.init_args.lr", "0.1", "--data.root", "d", "--model", "A", "--ckpt_path", "c"]
    assert cli.command_line_model_keys(argv) == {"val_flip", "val_scales", "optimizer"}
