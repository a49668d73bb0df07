"""The ``clipes`` and ``lightning`` commands: one LightningCLI for every stage of CLIP-ES.

    clipes predict -c experiments/voc_pseudo_labels.yaml --data.root DIR/VOC2012 --model.pretrained ViT-B-16.pt
    clipes fit -c experiments/synthetic.yaml
    clipes select-prompt -c experiments/voc_pseudo_labels.yaml --pretrained ViT-B-16.pt

Model and data are chosen in the YAML by ``class_path`` (``lightning_clipes.CLIPESLabeler``,
``lightning_clipes.VOCDataModule`` …); their constructors' type hints are the config schema. Paths,
weights and downloads are checked before anything heavy starts (:mod:`lightning_clipes.preflight`);
a problem is printed once, on rank 0, in one line; ``--debug`` (or ``CLIPES_DEBUG=1``) shows the traceback.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import jsonargparse
import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from packaging.version import Version
from tqdm import tqdm

from lightning_clipes.cluster import check_slurm_tasks, launcher_rank_zero, wandb_reachable  # noqa: F401
from lightning_clipes.preflight import ConfigError, preflight

DEBUG_ENV = "CLIPES_DEBUG"
# keep None values in the saved config; jsonargparse 4.49 renamed skip_none (a warning on every run) to skip_unset
_KEEP_NONE = {"skip_unset" if Version(jsonargparse.__version__) >= Version("4.49") else "skip_none": False}


class RunConfigCallback(SaveConfigCallback):
    """Saves ``config.yaml`` in the run's own folder (beside its ``checkpoints/``), not in the logger's shared
    ``save_dir``: with W&B every run of a sweep wrote ``outputs/config.yaml`` over the previous one."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        folder = trainer.strategy.broadcast(run_folder(trainer) if trainer.is_global_zero else None)
        if trainer.is_global_zero:
            Path(folder).mkdir(parents=True, exist_ok=True)
            self.parser.save(self.config, os.path.join(folder, self.config_filename), **_KEEP_NONE,
                             overwrite=True, multifile=self.multifile)
            self.config_path = os.path.join(folder, self.config_filename)
        self.already_saved = True


class CloseProgressBarsOnError(Callback):
    """Closes the progress bars of a run that fails. Lightning closes them only when a stage ends, so a failed
    run left its bar to the garbage collector, whose ``tqdm.__del__`` writes to stderr; with W&B's console capture
    installed that write sets context variables, and on Python 3.11 a context variable set from inside a
    collection can corrupt the ones being set when it started (CPython gh-148891): every later jsonargparse
    parse in that process failed. Matters wherever runs share a process (notebooks, sweeps in-process, tests)."""

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        bars = getattr(trainer.progress_bar_callback, "__dict__", {})  # none without a progress bar
        for bar in list(bars.values()):
            if isinstance(bar, tqdm):  # TQDMProgressBar's train/val/test/predict bars; Rich stops its own
                bar.close()


def run_folder(trainer: L.Trainer) -> str:
    """Where this run's checkpoints go, without ``checkpoints/``: ModelCheckpoint's own rule."""
    if not trainer.loggers:
        return str(trainer.default_root_dir)
    logger = trainer.loggers[0]
    save_dir = logger.save_dir or trainer.default_root_dir
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return os.path.join(save_dir, str(logger.name), version)


class CLIPESCLI(LightningCLI):
    """LightningCLI with model and data given by ``class_path`` and CLIP-ES defaults."""

    def add_arguments_to_parser(self, parser) -> None:
        # GradCAM needs autograd inside predict/validate, which Lightning runs under inference_mode by default.
        parser.set_defaults({"trainer.inference_mode": False})

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs) -> None:
        super()._add_subcommands(parser, **kwargs)
        # listed in `clipes --help`; main() runs it before LightningCLI sees the command line
        parser._subcommands_action.add_subcommand(
            "select-prompt", LightningArgumentParser(), help="Rank prompt templates by sharpness (CLIP-ES Eq. 9)")

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        self._command_line = list(sys.argv[1:]) if args is None else (list(args) if isinstance(args, (list, tuple)) else [])
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """The checkpoint's hyperparameters fill the model's settings, but not those given on the command line.

        Lightning (2.6) merges a ``--ckpt_path``'s hyperparameters over the whole model config, so
        ``clipes test --ckpt_path BEST.ckpt --model.val_flip true`` ran without flips, silently (the
        fix is Lightning's open PR #21455). Settings named on the command line win here; the rest,
        architecture included, comes from the checkpoint as before (a config file does not override it:
        the checkpoint knows the model it holds).
        """
        asked = self._model_init_args()
        given = command_line_model_keys(getattr(self, "_command_line", []))
        kept = {k: asked[k] for k in given if k in asked} if asked is not None else {}
        super()._parse_ckpt_path()
        merged = self._model_init_args()
        for key, value in kept.items():
            if merged is not None and key in merged:  # the checkpoint's class takes it too
                merged[key] = value

    def _model_init_args(self):
        """The subcommand's ``model.init_args`` (a jsonargparse Namespace, edited in place), or None."""
        subcommand = self.config.get("subcommand")
        model = self.config[subcommand].get("model") if subcommand else None
        return model.init_args if model is not None and "init_args" in model else None

    def before_instantiate_classes(self) -> None:
        """Check paths, weights and downloads; W&B goes offline (synced later) without a key or network."""
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        preflight(config, self.subcommand or "")
        loggers = config.get("trainer", {}).get("logger")
        if "WandbLogger" in str(loggers) and os.environ.get("WANDB_MODE") is None and not wandb_reachable():
            os.environ["WANDB_MODE"] = "offline"
            if launcher_rank_zero():
                print("W&B: no API key or no network; logging offline (upload later with `wandb sync`).", file=sys.stderr)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as err:  # noqa: BLE001 - jsonargparse wraps a constructor's error in its union report
            cause = root_cause(err)  # the constructor's own error, of its own type, without the report
            cause._clipes_config_error = True  # main() prints it in one line
            raise cause from None

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks.append(CloseProgressBarsOnError())
        check_slurm_tasks(trainer.num_devices, trainer.num_nodes)
        return trainer

    def after_fit(self) -> None:
        if self.trainer.is_global_zero:
            print(fit_summary(self.trainer, self.datamodule), file=sys.stderr, flush=True)


def command_line_model_keys(argv: list[str]) -> set[str]:
    """The model settings a command line names: ``--model.val_flip true``, ``--model.init_args.val_scales=[1]``,
    ``--model.optimizer.init_args.lr 0.1`` -> {"val_flip", "val_scales", "optimizer"}."""
    keys = set()
    for token in argv:
        if token.startswith("--model."):
            path = token[len("--model."):].split("=", 1)[0].split(".")
            if path[0] == "init_args":
                path = path[1:]
            if path and path[0]:
                keys.add(path[0])
    return keys


def fit_summary(trainer: L.Trainer, datamodule) -> str:
    """What a finished fit leaves behind: the best and last checkpoints, the score, the pseudo-labels, the config."""
    lines = [f"Done: {trainer.global_step} steps."]
    best = trainer.checkpoint_callback
    if best is not None and getattr(best, "best_model_path", ""):
        score = best.best_model_score
        lines.append(f"  best {best.monitor} {float(score):.4f}: {best.best_model_path}" if score is not None
                     else f"  best checkpoint: {best.best_model_path}")
    for cb in trainer.callbacks:
        last = getattr(cb, "last_model_path", "") or (getattr(cb, "best_model_path", "") if cb.__class__.__name__ == "LastCheckpoint" else "")
        if last and last != getattr(best, "best_model_path", None):
            lines.append(f"  last checkpoint: {last}")
            break
    metric = trainer.callback_metrics.get("val/mIoU")
    if metric is not None:
        lines.append(f"  val/mIoU at the end: {float(metric):.4f}")
    summary = getattr(datamodule, "summary", None)
    if summary:
        lines.append(f"  pseudo-labels: {summary['store']} ({summary['images']} images: {summary['reused']} reused, "
                     f"{summary['labelled']} labelled now, {summary['failed']} without a label)")
    for cb in trainer.callbacks:
        if isinstance(cb, RunConfigCallback) and getattr(cb, "config_path", None):
            lines.append(f"  config: {cb.config_path}")
    return "\n".join(lines)


def root_cause(err: BaseException) -> BaseException:
    """The innermost exception of a chain that was raised by our code or the libraries, not by jsonargparse."""
    chain, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        chain.append(err)
        err = err.__cause__ or err.__context__
    for cand in reversed(chain):
        if not type(cand).__module__.startswith("jsonargparse"):
            return cand
    return chain[0]


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if isinstance(err, (ValueError, OSError, ImportError, RuntimeError, ConfigError)) else f"{type(err).__name__}: {text}"


def cli_main(args: Optional[list[str]] = None) -> CLIPESCLI:
    """The LightningCLI behind ``clipes`` and ``lightning``; ``args`` replaces the command line (tests)."""
    return CLIPESCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        save_config_callback=RunConfigCallback,
        save_config_kwargs={"overwrite": True},
    )


def main(argv: Optional[list[str]] = None) -> None:
    """Console-script entry point: ``clipes select-prompt …`` ranks prompt templates, anything else is
    LightningCLI (fit/validate/test/predict). A configuration problem exits with status 2 and one line."""
    from_console = argv is None
    argv = list(sys.argv[1:] if from_console else argv)
    if "--debug" in argv:
        argv.remove("--debug")
        os.environ[DEBUG_ENV] = "1"
        if from_console:  # Lightning's DDP launcher re-runs sys.argv in every process
            sys.argv = [sys.argv[0], *argv]
    try:
        if argv[:1] == ["select-prompt"]:
            from lightning_clipes.prompt_selection import main as select_prompt

            select_prompt(argv[1:])
            return
        # From the console LightningCLI reads sys.argv itself (passing it again as args= makes it warn).
        cli_main(None if from_console else argv)
    except Exception as err:  # noqa: BLE001 - only configuration problems are shortened, the rest is re-raised
        if os.environ.get(DEBUG_ENV) or not (isinstance(err, ConfigError) or getattr(err, "_clipes_config_error", False)):
            raise
        if launcher_rank_zero():
            print(f"clipes: error: {one_line(err)}\n(run with --debug for the traceback)", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
