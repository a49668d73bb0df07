"""The ``clipes`` and ``lightning`` commands: one LightningCLI for every stage of CLIP-ES.

    clipes predict -c experiments/voc_pseudo_labels.yaml --data.root DIR/VOC2012 --model.pretrained ViT-B-16.pt

Model and data are chosen in the YAML by ``class_path`` (``lightning_clipes.CLIPESLabeler``,
``lightning_clipes.VOCDataModule`` …); their constructors' type hints are the config schema.
"""
from __future__ import annotations

from typing import Optional

import lightning as L
from lightning.pytorch.cli import LightningCLI


class CLIPESCLI(LightningCLI):
    """LightningCLI with model and data given by ``class_path`` and CLIP-ES defaults."""

    def add_arguments_to_parser(self, parser) -> None:
        # GradCAM needs autograd inside predict/validate, which Lightning runs under inference_mode by default.
        parser.set_defaults({"trainer.inference_mode": False})


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


def main() -> None:
    """Console-script entry point (returns None, so the exit status is 0 on success)."""
    cli_main()


if __name__ == "__main__":
    main()
