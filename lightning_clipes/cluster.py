"""Running on a SLURM cluster: the task-count check of the CLI, the callbacks that keep ``last.ckpt`` current and
one ``hpc_ckpt``, and the W&B reachability test that decides whether logging goes offline.

Lightning's side of a requeue (``SLURMEnvironment(auto_requeue=True)``): on SIGUSR1 every rank calls
``trainer.save_checkpoint(<default_root_dir>/hpc_ckpt_<n+1>.ckpt)``, rank 0 runs ``scontrol requeue``, and the
requeued job resumes from the highest ``<n>`` (``_CheckpointConnector.hpc_save_path`` / ``_hpc_resume_path``).
Nothing ever deletes the older ones; :class:`RequeueCheckpoints` does.
"""
from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Any, Optional, Union
from urllib.parse import urlsplit

from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_info

HPC_CHECKPOINT = re.compile(r"hpc_ckpt_(\d+)\.ckpt")


def launcher_rank_zero() -> bool:
    """Global rank 0 as the launchers say it (torchrun, SLURM, Lightning's own DDP launcher), usable before
    Lightning has set up anything: for messages that should be printed once per job, not once per process."""
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "0") not in ("", "0"):
            return False
    return os.environ.get("LOCAL_RANK", "0") in ("", "0") and os.environ.get("NODE_RANK", "0") in ("", "0")


# ------------------------------------------------------------------------------------------------- SLURM tasks
def check_slurm_tasks(num_devices: int, num_nodes: int) -> None:
    """Refuse a trainer whose processes (``num_devices`` x ``num_nodes``) are not the tasks SLURM started.

    Under SLURM (as Lightning sees it: ``SLURM_NTASKS`` set and the job not named ``bash``/``interactive``,
    ``SLURMEnvironment.detect``) srun starts the processes and Lightning only joins them. Lightning compares
    ``--ntasks-per-node`` with ``devices`` only when it builds a DDP launcher, so ``devices=1`` under 2 tasks runs
    two independent trainings into the same folders. Raises ``ValueError`` with a one-line fix.
    """
    if not SLURMEnvironment.detect():
        return
    ntasks = int(os.environ["SLURM_NTASKS"])
    if num_devices * num_nodes != ntasks:
        raise ValueError(
            f"SLURM started {ntasks} tasks (SLURM_NTASKS={ntasks}) but the trainer uses {num_devices} device(s) x "
            f"{num_nodes} node(s) = {num_devices * num_nodes} process(es), so each task would train on its own; set "
            f"--trainer.devices (tasks per node) and --trainer.num_nodes so that devices x num_nodes = {ntasks}, "
            "or change sbatch --ntasks-per-node/--nodes."
        )


# ------------------------------------------------------------------------------------------ requeue checkpoints
class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt`` (in ModelCheckpoint's usual folder, or ``dirpath``) at every validation and at the end of
    training, whatever the monitored metric did: what a job resumes from after a preemption.

    ``ModelCheckpoint(monitor=..., save_last=True)`` writes ``last.ckpt`` only when it saves a new top-k, so a job
    whose ``val/mIoU`` got worse would resume from the best step, not the last. The save at the end covers a
    ``max_steps`` that is not a multiple of ``val_check_interval``, and the validations that come one step early
    after resuming from an hpc checkpoint written in the middle of a batch (global step 159 instead of 160).
    """

    def __init__(self, dirpath: Optional[str] = None) -> None:
        super().__init__(dirpath=dirpath, filename=self.CHECKPOINT_NAME_LAST, monitor=None, save_top_k=1,
                         enable_version_counter=False)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if not self._should_skip_saving_checkpoint(trainer):  # this step is not saved yet (and not fast_dev_run)
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))  # as on_validation_end does


def hpc_checkpoints(folder: Union[str, Path]) -> list[Path]:
    """The ``hpc_ckpt_<n>.ckpt`` files of ``folder``, oldest (lowest ``n``, as Lightning numbers them) first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := HPC_CHECKPOINT.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def prune_hpc_checkpoints(folder: Union[str, Path], keep: int = 1) -> list[Path]:
    """Delete all but the ``keep`` newest ``hpc_ckpt_<n>.ckpt`` of ``folder``; returns the deleted paths.

    ``keep`` must be at least 1: Lightning numbers the next one after the highest that exists, and resumes from it.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (a requeued job resumes from the newest hpc checkpoint), got {keep}.")
    old = hpc_checkpoints(folder)[:-keep]
    for path in old:
        path.unlink(missing_ok=True)
    return old


class RequeueCheckpoints(Callback):
    """Keeps only the newest ``hpc_ckpt_<n>.ckpt`` in ``trainer.default_root_dir`` and says where a resumed fit starts.

    Each hpc checkpoint holds the full training state (172 MB for DeepLabV3+ R101 with SGD momentum), one per requeue.
    Global rank 0 deletes the older ones (a) when training has resumed (``on_train_start``: every state is restored,
    so the checkpoint resumed from is no longer needed unless it is the newest) and (b) after a new one is written:
    ``on_save_checkpoint`` runs before the file is written, so the deletion waits for the next training batch, the
    end of training, or the exception that a requeue's SIGTERM raises.
    """

    def __init__(self) -> None:
        self._saved = False

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.ckpt_path is not None:
            rank_zero_info(f"Resumed at global step {trainer.global_step} from {trainer.ckpt_path}")
        self._prune(trainer)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._saved = True

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        if self._saved:
            self._prune(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._prune(trainer)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._prune(trainer)

    def _prune(self, trainer: Trainer) -> None:
        self._saved = False
        if trainer.is_global_zero:
            for path in prune_hpc_checkpoints(trainer.default_root_dir):
                rank_zero_info(f"Deleted the older requeue checkpoint {path}")


# ---------------------------------------------------------------------------------------------------------- W&B
def wandb_base_url() -> str:
    """The W&B server the installed wandb talks to: ``WANDB_BASE_URL`` when set, else wandb's own default
    (``wandb.Settings().base_url``; which server that is changes between wandb versions)."""
    import wandb

    url = os.environ.get("WANDB_BASE_URL")
    return wandb.Settings(**({"base_url": url} if url else {})).base_url


def _netrc_has_key(url: str) -> bool:
    """``~/.netrc`` (or ``$NETRC``) holds an API key for ``url``, as wandb looks it up."""
    try:
        from wandb.sdk.lib.wbauth import read_netrc_auth  # knows the hosts that share a key
    except ImportError:  # older wandb: the host's own entry
        import netrc

        path = os.environ.get("NETRC") or Path.home() / ".netrc"
        try:
            return netrc.netrc(path).authenticators(urlsplit(url).netloc) is not None
        except (OSError, netrc.NetrcParseError):
            return False
    try:
        return read_netrc_auth(host=url) is not None
    except Exception:  # a malformed key: wandb.init will say so itself
        return True


def wandb_reachable(timeout: float = 2.0, url: Optional[str] = None) -> bool:
    """An API key is configured and the W&B server (``url``, default :func:`wandb_base_url`) accepts a TCP
    connection within ``timeout`` seconds, so ``wandb.init`` will not hang on a compute node without network."""
    url = url or wandb_base_url()
    if not os.environ.get("WANDB_API_KEY") and not _netrc_has_key(url):
        return False
    parts = urlsplit(url)
    port = parts.port or (80 if parts.scheme == "http" else 443)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False
