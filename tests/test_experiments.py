"""Every config in experiments/ runs one batch on tiny settings (lightning-hydra-template's test_sweeps)."""
from pathlib import Path

import pytest

from lightning_clipes.cli import cli_main

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
@pytest.mark.parametrize("stage", ["predict", "validate"])
def test_config_runs_one_batch(config, stage, synthetic_voc, tiny_openai_ckpt, tmp_path):
    cli_main([
        stage, "-c", str(config),
        "--data.root", str(synthetic_voc), "--data.num_workers", "0",
        "--model.pretrained", str(tiny_openai_ckpt), "--model.affinity_layers", "2",
        "--trainer.default_root_dir", str(tmp_path / "out"), "--trainer.accelerator", "cpu",
        "--trainer.devices", "1", "--trainer.fast_dev_run", "1",
    ])
