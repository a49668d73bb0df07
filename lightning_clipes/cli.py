"""The ``clipes`` and ``lightning`` commands: one LightningCLI for every stage of CLIP-ES.

    clipes predict -c experiments/voc_pseudo_labels.yaml --data.root DIR/VOC2012 --model.pretrained ViT-B-16.pt

Model and data are chosen in the YAML by ``class_path`` (``lightning_clipes.CLIPESLabeler``,
``lightning_clipes.VOCDataModule`` …); their constructors' type hints are the config schema.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

import lightning as L
from lightning.pytorch.cli import LightningCLI

# --- cluster hooks: the logic lives in lightning_clipes/cluster.py (wandb_reachable is re-exported for old imports)
from lightning_clipes.cluster import check_slurm_tasks, wandb_reachable  # noqa: F401
# --- end cluster hooks


class CLIPESCLI(LightningCLI):
    """LightningCLI with model and data given by ``class_path`` and CLIP-ES defaults."""

    def add_arguments_to_parser(self, parser) -> None:
        # GradCAM needs autograd inside predict/validate, which Lightning runs under inference_mode by default.
        parser.set_defaults({"trainer.inference_mode": False})

    def before_instantiate_classes(self) -> None:
        """W&B runs offline (synced later with ``wandb sync``) when there is no key or no network."""
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        loggers = config.get("trainer", {}).get("logger")
        uses_wandb = "WandbLogger" in str(loggers)
        if uses_wandb and os.environ.get("WANDB_MODE") is None and not wandb_reachable():
            os.environ["WANDB_MODE"] = "offline"
            print("W&B: no API key or no network; logging offline (upload later with `wandb sync`).", file=sys.stderr)

    # --- cluster hook: refuse a trainer whose processes are not the tasks SLURM started (lightning_clipes/cluster.py)
    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        check_slurm_tasks(trainer.num_devices, trainer.num_nodes)
        return trainer
    # --- end cluster hook


def cli_main(args: Optional[list[str]] = None) -> CLIPESCLI:
    """Entry point of ``clipes`` and ``lightning``; ``args`` replaces ``sys.argv[1:]`` (tests)."""
    return CLIPESCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        save_config_kwargs={"overwrite": True},
    )


def main(argv: Optional[list[str]] = None) -> None:
    """Console-script entry point: ``clipes select-prompt …`` ranks prompt templates, anything else is
    LightningCLI (fit/validate/test/predict). Returns None, so the exit status is 0 on success."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["select-prompt"]:
        from lightning_clipes.prompt_selection import main as select_prompt

        select_prompt(argv[1:])
        return
    cli_main(argv)


if __name__ == "__main__":
    main()
