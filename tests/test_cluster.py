"""SLURM without a cluster: Lightning's SLURM detection under simulated job variables, the CLI's task-count check,
the auto-requeue cycle (SIGUSR1 -> hpc checkpoint + `scontrol requeue` -> the requeued job resumes, older hpc
checkpoints pruned), last.ckpt at every validation, the W&B server check, and the sbatch scripts of experiments/slurm/
run by bash with stand-ins for srun, conda and wandb, their command lines parsed by the CLI.
With a real SLURM: tests/test_slurm_cluster.py."""
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel
from lightning.pytorch.plugins.environments import LightningEnvironment, SLURMEnvironment

from lightning_clipes.cli import cli_main
from lightning_clipes.cluster import (
    RequeueCheckpoints, check_slurm_tasks, hpc_checkpoints, prune_hpc_checkpoints, wandb_base_url, wandb_reachable,
)

REPO = Path(__file__).resolve().parents[1]
SLURM_DIR = REPO / "experiments" / "slurm"
SYNTHETIC = REPO / "experiments" / "synthetic.yaml"
FIT_SCRIPTS = sorted(SLURM_DIR.glob("fit_*.sbatch"))
JOB_ID = "987654"


@pytest.fixture(autouse=True)
def keep_environment():
    """SLURMEnvironment writes MASTER_ADDR/MASTER_PORT into os.environ (monkeypatch.delenv of an absent variable
    does not undo that); a leaked gpu-node07 would make a later DDP test wait for a host that does not exist."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def keep_rank_zero(monkeypatch):
    """A DDP Trainer built as global rank 6 writes Lightning's process-wide rank_zero_only.rank (later tests would
    stop logging); monkeypatch puts every copy of it back after the test."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only as fabric_rank_zero_only
    from lightning.pytorch.utilities.rank_zero import rank_zero_only as pytorch_rank_zero_only
    from lightning_utilities.core.rank_zero import rank_zero_only as utilities_rank_zero_only

    for function in (fabric_rank_zero_only, pytorch_rank_zero_only, utilities_rank_zero_only):
        monkeypatch.setattr(function, "rank", getattr(function, "rank", 0))


def simulate_slurm(monkeypatch, nodes: int, tasks_per_node: int, node: int, local: int, job_name: str = "clipes-voc"):
    """The variables srun sets for one task of an allocation of nodes x tasks_per_node tasks."""
    for name in ("MASTER_ADDR", "MASTER_PORT", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)  # SLURMEnvironment sets MASTER_* itself; keep_environment undoes it
    nodelist = f"gpu-node[07-{7 + nodes - 1:02d}]" if nodes > 1 else "gpu-node07"
    monkeypatch.setenv("SLURM_JOB_ID", JOB_ID)
    monkeypatch.setenv("SLURM_JOB_NAME", job_name)
    monkeypatch.setenv("SLURM_NTASKS", str(nodes * tasks_per_node))
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", str(tasks_per_node))
    monkeypatch.setenv("SLURM_NNODES", str(nodes))
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", str(nodes))
    monkeypatch.setenv("SLURM_NODEID", str(node))
    monkeypatch.setenv("SLURM_LOCALID", str(local))
    monkeypatch.setenv("SLURM_PROCID", str(node * tasks_per_node + local))
    monkeypatch.setenv("SLURM_NODELIST", nodelist)
    monkeypatch.setenv("SLURM_JOB_NODELIST", nodelist)


# ------------------------------------------------------------------------------------------- Lightning's view
def test_slurm_environment_reads_ranks_and_main_node_from_the_job(monkeypatch):
    simulate_slurm(monkeypatch, nodes=2, tasks_per_node=4, node=1, local=2)
    assert SLURMEnvironment.detect()
    env = SLURMEnvironment()
    assert (env.world_size(), env.global_rank(), env.local_rank(), env.node_rank()) == (8, 6, 2, 1)
    assert env.main_address == "gpu-node07"                 # first host of gpu-node[07-08]
    assert env.main_port == 15000 + int(JOB_ID[-4:])        # every task derives the same port from the job id
    assert env.auto_requeue and env.requeue_signal == signal.SIGUSR1


def test_trainer_takes_the_slurm_layout_and_sets_the_requeue_handler(monkeypatch):
    simulate_slurm(monkeypatch, nodes=2, tasks_per_node=4, node=1, local=2)
    trainer = Trainer(accelerator="cpu", devices=4, num_nodes=2, strategy="ddp", logger=False)  # not fitted
    assert isinstance(trainer._accelerator_connector.cluster_environment, SLURMEnvironment)
    assert trainer.strategy.cluster_environment.creates_processes_externally  # srun starts them, not Lightning
    assert (trainer.world_size, trainer.global_rank, trainer.local_rank, trainer.node_rank) == (8, 6, 2, 1)
    assert trainer.strategy.cluster_environment.main_address == "gpu-node07"

    before = signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)
    try:
        trainer._signal_connector.register_signal_handlers()  # what Trainer._run does before fitting
        assert signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, signal.SIG_IGN, None, before[0])
    finally:
        trainer._signal_connector.teardown()
        signal.signal(signal.SIGUSR1, before[0])
        signal.signal(signal.SIGTERM, before[1])


def check_sizes_as_fit_does(trainer: Trainer) -> None:
    """What trainer.fit does first (the launcher's launch), before any data or labelling."""
    launcher = trainer.strategy.launcher
    launcher.cluster_environment.validate_settings(num_devices=launcher.num_processes, num_nodes=launcher.num_nodes)


@pytest.mark.parametrize("bad", ["devices", "num_nodes"])
def test_fit_refuses_sizes_that_differ_from_the_allocation(monkeypatch, bad):
    simulate_slurm(monkeypatch, nodes=2, tasks_per_node=4, node=0, local=0)
    check_sizes_as_fit_does(Trainer(accelerator="cpu", strategy="ddp", logger=False, devices=4, num_nodes=2))
    sizes = {"devices": 4, "num_nodes": 2, bad: 3}
    trainer = Trainer(accelerator="cpu", strategy="ddp", logger=False, **sizes)
    with pytest.raises(ValueError, match="--ntasks-per-node" if bad == "devices" else "--nodes"):
        check_sizes_as_fit_does(trainer)


def test_a_job_named_interactive_is_not_treated_as_slurm(monkeypatch):
    """sweep_agent.sbatch relies on this: the agent's runs start their GPU processes themselves."""
    simulate_slurm(monkeypatch, nodes=1, tasks_per_node=1, node=0, local=0, job_name="interactive")
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    assert isinstance(trainer._accelerator_connector.cluster_environment, LightningEnvironment)
    assert not trainer.strategy.cluster_environment.creates_processes_externally  # Lightning starts one per device


class TimeLimitNear(Callback):
    """What SLURM does 90 s before the limit with --signal=SIGUSR1@90, at global step ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:  # without Lightning's handler SIGUSR1 would end pytest itself
            assert signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, None), "auto-requeue is off"
            os.kill(os.getpid(), signal.SIGUSR1)


class AtTrainStart(Callback):
    """Records the step a fit starts from and the hpc checkpoints there are at that moment."""

    def on_train_start(self, trainer, *args):
        self.step = trainer.global_step
        self.hpc = [p.name for p in hpc_checkpoints(trainer.default_root_dir)]


def hpc_step(path: Path) -> int:
    return torch.load(path, weights_only=False)["global_step"]


def test_sigusr1_saves_an_hpc_checkpoint_requeues_and_the_requeued_job_resumes(tmp_path, monkeypatch):
    """The cycle the sbatch scripts rely on, twice, with `scontrol` a stand-in that records its arguments (so the
    signalled job is not killed and runs to its max_steps): each requeued job resumes from the newest hpc checkpoint,
    which RequeueCheckpoints keeps while the job resumes from it, and deletes once a newer one is written."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub(bin_dir / "scontrol", 'echo "$@" >> "$SCONTROL_RECORD"')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SCONTROL_RECORD", str(tmp_path / "scontrol.txt"))
    simulate_slurm(monkeypatch, nodes=1, tasks_per_node=1, node=0, local=0)
    root = tmp_path / "out"

    common = dict(accelerator="cpu", devices=1, default_root_dir=root, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False)
    Trainer(max_steps=5, callbacks=[TimeLimitNear(3), RequeueCheckpoints()], **common).fit(BoringModel())
    assert sorted(p.name for p in root.iterdir()) == ["hpc_ckpt_1.ckpt"]
    assert hpc_step(root / "hpc_ckpt_1.ckpt") == 3
    assert (tmp_path / "scontrol.txt").read_text().split() == ["requeue", JOB_ID]

    # the requeued job: same job id, same default_root_dir, no ckpt_path; requeued again at step 6
    start = AtTrainStart()
    requeued = Trainer(max_steps=8, callbacks=[RequeueCheckpoints(), start, TimeLimitNear(6)], **common)
    requeued.fit(BoringModel())
    assert (start.step, start.hpc, requeued.global_step) == (3, ["hpc_ckpt_1.ckpt"], 8)
    assert sorted(p.name for p in root.iterdir()) == ["hpc_ckpt_2.ckpt"] and hpc_step(root / "hpc_ckpt_2.ckpt") == 6
    assert (tmp_path / "scontrol.txt").read_text().split() == ["requeue", JOB_ID] * 2

    start = AtTrainStart()
    again = Trainer(max_steps=9, callbacks=[RequeueCheckpoints(), start], **common)
    again.fit(BoringModel())
    assert (start.step, start.hpc, again.global_step) == (6, ["hpc_ckpt_2.ckpt"], 9)
    assert sorted(p.name for p in root.iterdir()) == ["hpc_ckpt_2.ckpt"]


def test_a_resumed_fit_deletes_the_older_hpc_checkpoints_once_it_has_resumed(tmp_path, monkeypatch):
    """Left over from jobs before RequeueCheckpoints: all but the newest go when training has resumed from it."""
    simulate_slurm(monkeypatch, nodes=1, tasks_per_node=1, node=0, local=0)
    root = tmp_path / "out"
    common = dict(accelerator="cpu", devices=1, default_root_dir=root, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False)
    trainer = Trainer(max_steps=2, **common)
    trainer.fit(BoringModel())
    for n in (2, 10, 9):  # Lightning resumes from the highest number (10), whatever the files' times
        trainer.save_checkpoint(root / f"hpc_ckpt_{n}.ckpt")
    (root / "notes.txt").write_text("kept")

    start = AtTrainStart()
    resumed = Trainer(max_steps=4, callbacks=[start, RequeueCheckpoints()], **common)
    resumed.fit(BoringModel())
    assert start.step == 2 and start.hpc == ["hpc_ckpt_2.ckpt", "hpc_ckpt_9.ckpt", "hpc_ckpt_10.ckpt"]
    assert str(resumed.ckpt_path).endswith("hpc_ckpt_10.ckpt")
    assert sorted(p.name for p in root.iterdir()) == ["hpc_ckpt_10.ckpt", "notes.txt"]


def test_prune_hpc_checkpoints_keeps_the_highest_numbers(tmp_path):
    for name in ["hpc_ckpt_1.ckpt", "hpc_ckpt_9.ckpt", "hpc_ckpt_10.ckpt", "hpc_ckpt_x.ckpt", "last.ckpt"]:
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in prune_hpc_checkpoints(tmp_path, keep=2)] == ["hpc_ckpt_1.ckpt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hpc_ckpt_10.ckpt", "hpc_ckpt_9.ckpt", "hpc_ckpt_x.ckpt",
                                                         "last.ckpt"]
    assert prune_hpc_checkpoints(tmp_path / "missing") == []
    with pytest.raises(ValueError, match="keep must be >= 1"):
        prune_hpc_checkpoints(tmp_path, keep=0)


# ------------------------------------------------------------------------------------------- the CLI's task check
@pytest.mark.parametrize("nodes,tasks_per_node,devices,num_nodes", [(1, 2, 2, 1), (2, 4, 4, 2)])
def test_task_check_accepts_one_process_per_slurm_task(monkeypatch, nodes, tasks_per_node, devices, num_nodes):
    simulate_slurm(monkeypatch, nodes=nodes, tasks_per_node=tasks_per_node, node=0, local=0)
    check_slurm_tasks(devices, num_nodes)


@pytest.mark.parametrize("devices,num_nodes", [(1, 1), (4, 1), (2, 2)])
def test_task_check_refuses_processes_that_are_not_the_slurm_tasks(monkeypatch, devices, num_nodes):
    simulate_slurm(monkeypatch, nodes=1, tasks_per_node=2, node=0, local=0)
    with pytest.raises(ValueError) as error:
        check_slurm_tasks(devices, num_nodes)
    message = str(error.value)
    assert "\n" not in message and "SLURM_NTASKS=2" in message
    assert f"{devices} device(s) x {num_nodes} node(s) = {devices * num_nodes}" in message
    assert "--trainer.devices" in message and "--trainer.num_nodes" in message


def test_task_check_is_off_where_lightning_does_not_use_slurm(monkeypatch):
    simulate_slurm(monkeypatch, nodes=1, tasks_per_node=2, node=0, local=0, job_name="interactive")  # salloc's shell
    check_slurm_tasks(1, 1)
    for name in [n for n in os.environ if n.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    check_slurm_tasks(1, 1)


def test_cli_refuses_one_device_under_two_slurm_tasks_before_the_labelling_pass(tmp_path, monkeypatch):
    """Each of the two tasks would otherwise run its own training into the same version_0."""
    simulate_slurm(monkeypatch, nodes=1, tasks_per_node=2, node=0, local=0)
    with pytest.raises(ValueError, match=r"SLURM_NTASKS=2.*1 device\(s\) x 1 node\(s\)"):
        cli_main(["fit", "-c", str(SYNTHETIC), "--trainer.accelerator", "cpu", "--trainer.devices", "1",
                  "--data.root", str(tmp_path / "VOC2012"), "--data.store_dir", str(tmp_path / "store"),
                  "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.logger", "false"])
    assert not (tmp_path / "VOC2012").exists() and not (tmp_path / "store").exists()


# ------------------------------------------------------------------------------------------- last.ckpt
class WorseningModel(BoringModel):
    """Logs a val/mIoU that only gets worse after the first validation."""

    def validation_step(self, batch, batch_idx):
        self.log("val/mIoU", 1.0 / (1 + self.global_step))
        return super().validation_step(batch, batch_idx)


def config_callbacks(config: Path) -> list:
    data = yaml.safe_load(config.read_text())
    return data["callbacks"] if "callbacks" in data else data["trainer"]["callbacks"]


CALLBACK_CONFIGS = [REPO / "experiments" / "trainer_default.yaml", SYNTHETIC]


@pytest.mark.parametrize("config", CALLBACK_CONFIGS, ids=[c.stem for c in CALLBACK_CONFIGS])
def test_last_checkpoint_is_the_last_validation_even_when_val_miou_got_worse(config, tmp_path):
    """A requeue after a preemption resumes from the newest of last.ckpt/hpc_ckpt: last.ckpt must be the last step,
    not the best one (Lightning's save_last writes it only with a new top-k), also when training ends between two
    validations."""
    callbacks = tmp_path / "callbacks.yaml"
    callbacks.write_text(yaml.safe_dump({"trainer": {"callbacks": config_callbacks(config)}}))
    LightningCLI(WorseningModel, BoringDataModule, save_config_kwargs={"overwrite": True}, args=[
        "fit", "-c", str(callbacks), "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.max_steps=7",
        "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
        "--trainer.logger=CSVLogger", f"--trainer.logger.save_dir={tmp_path}", f"--trainer.default_root_dir={tmp_path}",
    ])
    steps = {p.name: torch.load(p, weights_only=False)["global_step"] for p in tmp_path.rglob("*.ckpt")}
    assert steps.pop("last.ckpt") == 7  # validations at 2, 4, 6 with val/mIoU 1/3, 1/5, 1/7; the end at 7
    assert list(steps.values()) == [2]  # and the best checkpoint is still the first


# ------------------------------------------------------------------------------------------- W&B server
@pytest.fixture
def no_wandb_key(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))


def test_wandb_server_is_the_installed_wandbs_unless_wandb_base_url_is_set(no_wandb_key, monkeypatch):
    import wandb

    assert wandb_base_url() == wandb.Settings().base_url  # the default of this wandb version, whatever it is
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org:8443")
    assert wandb_base_url() == "https://wandb.example.org:8443"


def test_wandb_is_reachable_with_a_key_and_a_server_that_answers(no_wandb_key, tmp_path, monkeypatch):
    import socket

    with socket.create_server(("127.0.0.1", 0)) as server:
        url = f"http://127.0.0.1:{server.getsockname()[1]}"
        monkeypatch.setenv("WANDB_BASE_URL", url)
        assert not wandb_reachable()  # no key anywhere: wandb.init would ask for one
        netloc = f"127.0.0.1:{server.getsockname()[1]}"
        (tmp_path / ".netrc").write_text(f"machine {netloc} login user password {'k' * 40}\n")
        (tmp_path / ".netrc").chmod(0o600)
        assert wandb_reachable()  # the key for exactly this server, as `wandb login --host` writes it
        (tmp_path / ".netrc").unlink()
        monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
        assert wandb_reachable()
    assert not wandb_reachable(timeout=0.5)  # nothing listens there any more


# ------------------------------------------------------------------------------------------- the sbatch scripts
def stub(path: Path, body: str) -> None:
    path.write_text(f"#!/bin/bash\n{body}\n")
    path.chmod(0o755)


def sbatch_options(script: Path) -> dict[str, str]:
    """The #SBATCH header as sbatch reads it: up to the first command, '#' starts a comment."""
    options = {}
    for line in script.read_text().splitlines():
        if line.startswith("#SBATCH"):
            for word in line[len("#SBATCH"):].split("#")[0].split():
                key, _, value = word.lstrip("-").partition("=")
                options[key] = value
        elif line.strip() and not line.lstrip().startswith("#"):
            break
    return options


def run_script(script: Path, tmp_path: Path, slurm: dict, env: dict = None, args=()) -> subprocess.CompletedProcess:
    """bash SCRIPT as sbatch would run it, with srun/conda/clipes/wandb replaced by recorders."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stub(bin_dir / "srun", 'printf "%s\\0" "$@" > "$RECORD"')
    stub(bin_dir / "wandb", 'printf "%s\\0" "$@" SLURM_JOB_NAME="$SLURM_JOB_NAME" VOC_ROOT="$VOC_ROOT" > "$RECORD"')
    stub(bin_dir / "conda", '[[ "$1" == shell.bash ]] || echo "$@" >> "$CONDA_RECORD"')
    stub(bin_dir / "clipes", "exit 3  # never run: srun is a recorder")
    base = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "RECORD": str(tmp_path / "argv"),
            "CONDA_RECORD": str(tmp_path / "conda.txt"), "SLURM_SUBMIT_DIR": str(REPO), "SLURM_JOB_ID": JOB_ID}
    return subprocess.run(["bash", str(script), *args], env={**base, **slurm, **(env or {})}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)


def allocation(script: Path) -> dict:
    """The variables SLURM sets in the batch step of the allocation the header asks for."""
    opts = sbatch_options(script)
    return {"SLURM_NTASKS_PER_NODE": opts["ntasks-per-node"], "SLURM_JOB_NUM_NODES": opts["nodes"],
            "SLURM_CPUS_PER_TASK": opts["cpus-per-task"]}


def recorded(tmp_path: Path) -> list[str]:
    return (tmp_path / "argv").read_text().split("\0")[:-1]


@pytest.mark.parametrize("script", FIT_SCRIPTS, ids=[s.stem for s in FIT_SCRIPTS])
def test_fit_script_header_asks_for_one_task_per_gpu_and_requeue(script):
    opts = sbatch_options(script)
    assert opts["gres"] == f"gpu:{opts['ntasks-per-node']}"
    assert opts["signal"] == "SIGUSR1@90" and "requeue" in opts
    assert opts["output"] == "logs/%x-%j.out"
    text = script.read_text()
    assert re.search(r"^# --- variables", text, re.M) and re.search(r"^# --- end variables", text, re.M)
    assert re.search(r'^CONDA_ENV=', text, re.M) and re.search(r'^VENV=', text, re.M)


def printed_config(clipes_args, capsys, monkeypatch) -> dict:
    """The config that ``clipes <clipes_args>`` would run, resolved by ``--print_config`` in the repository
    (where the scripts run clipes: their config paths are relative to it)."""
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exit_:
        cli_main([*clipes_args, "--print_config"])
    out = capsys.readouterr()
    assert exit_.value.code == 0, out.err[-3000:]
    return yaml.safe_load(out.out)


@pytest.mark.parametrize("script", FIT_SCRIPTS, ids=[s.stem for s in FIT_SCRIPTS])
def test_fit_script_srun_line_with_its_defaults_parses_with_the_cli(script, tmp_path, capsys, monkeypatch):
    opts = sbatch_options(script)
    done = run_script(script, tmp_path, allocation(script))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "conda.txt").read_text().split() == ["activate", "lightning_clipes"]
    argv = recorded(tmp_path)
    clipes_args = argv[argv.index("clipes") + 1:]
    assert clipes_args[:3] == ["fit", "-c", "experiments/voc.yaml"] and "--ckpt_path" not in clipes_args
    assert clipes_args[clipes_args.index("--trainer.devices") + 1] == opts["ntasks-per-node"]
    assert clipes_args[clipes_args.index("--trainer.num_nodes") + 1] == opts["nodes"]

    config = printed_config(clipes_args, capsys, monkeypatch)
    trainer, data = config["trainer"], config["data"]["init_args"]
    assert (str(trainer["devices"]), str(trainer["num_nodes"])) == (opts["ntasks-per-node"], opts["nodes"])
    # ... sizes that Lightning accepts inside the allocation the header asks for (last task of the last node)
    nodes, tasks = int(opts["nodes"]), int(opts["ntasks-per-node"])
    simulate_slurm(monkeypatch, nodes=nodes, tasks_per_node=tasks, node=nodes - 1, local=tasks - 1)
    ddp = Trainer(accelerator="cpu", strategy="ddp", logger=False, devices=trainer["devices"],
                  num_nodes=trainer["num_nodes"])
    check_sizes_as_fit_does(ddp)
    assert (ddp.world_size, ddp.global_rank) == (nodes * tasks, nodes * tasks - 1)
    assert trainer["default_root_dir"] == str(REPO / "outputs" / f"voc-{JOB_ID}")  # the requeued job finds it again
    assert trainer["logger"]["init_args"]["save_dir"] == trainer["default_root_dir"]
    assert "--data.root" not in clipes_args  # DATA_ROOT unset: the config's own root (relative to the repository)
    assert data["store_dir"] == str(REPO / "outputs" / "pseudo_labels")
    assert data["labeler"]["init_args"]["pretrained"] == str(REPO / "weights" / "ViT-B-16.pt")


@pytest.mark.parametrize("script", FIT_SCRIPTS, ids=[s.stem for s in FIT_SCRIPTS])
def test_fit_script_runs_the_experiment_named_by_config_with_its_data_root(script, tmp_path, capsys, monkeypatch):
    """CONFIG picks the experiment; DATA_ROOT becomes --data.root; CLIP_WEIGHTS= and CONDA_ENV= (empty) pass
    nothing: the config's pretrained weights, the environment sbatch was called from."""
    opts = sbatch_options(script)
    env = {"CONFIG": "experiments/synthetic.yaml", "DATA_ROOT": str(tmp_path / "VOC2012"), "CLIP_WEIGHTS": "",
           "CONDA_ENV": ""}
    done = run_script(script, tmp_path, allocation(script), env=env, args=["--trainer.max_steps", "3"])
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "conda.txt").exists()
    argv = recorded(tmp_path)
    clipes_args = argv[argv.index("clipes") + 1:]
    assert clipes_args[:3] == ["fit", "-c", "experiments/synthetic.yaml"]
    assert clipes_args[-2:] == ["--trainer.max_steps", "3"]
    assert "--data.labeler.init_args.pretrained" not in clipes_args

    config = printed_config(clipes_args, capsys, monkeypatch)
    trainer, data = config["trainer"], config["data"]["init_args"]
    sizes = (str(trainer["devices"]), str(trainer["num_nodes"]), trainer["max_steps"])
    assert sizes == (opts["ntasks-per-node"], opts["nodes"], 3)
    assert trainer["default_root_dir"] == str(REPO / "outputs" / f"synthetic-{JOB_ID}")  # named after the config
    assert (data["root"], data["store_dir"]) == (str(tmp_path / "VOC2012"), str(REPO / "outputs" / "pseudo_labels"))


@pytest.mark.parametrize("args", [["-c", "x.yaml"], ["--config", "x.yaml"], ["--config=x.yaml"], ["-c=x.yaml"]])
def test_fit_script_refuses_a_config_among_its_arguments(args, tmp_path):
    script = SLURM_DIR / "fit_1node.sbatch"
    done = run_script(script, tmp_path, allocation(script), args=["--trainer.max_steps", "3", *args])
    assert done.returncode == 1 and not (tmp_path / "argv").exists()
    assert f"'{args[0]}'" in done.stderr and "CONFIG=" in done.stderr


def test_fit_script_says_that_voc_root_is_now_data_root(tmp_path):
    script = SLURM_DIR / "fit_1node.sbatch"
    done = run_script(script, tmp_path, allocation(script), env={"VOC_ROOT": "/data/VOC2012"})
    assert done.returncode == 0 and "--data.root" not in recorded(tmp_path)
    assert "Set DATA_ROOT=/data/VOC2012" in done.stderr


def test_fit_script_stops_when_config_does_not_exist(tmp_path):
    script = SLURM_DIR / "fit_1node.sbatch"
    done = run_script(script, tmp_path, allocation(script), env={"CONFIG": "experiments/nope.yaml"})
    assert done.returncode == 1 and not (tmp_path / "argv").exists()
    assert "CONFIG=experiments/nope.yaml does not exist" in done.stderr


@pytest.mark.parametrize("variable", ["SLURM_NTASKS_PER_NODE", "SLURM_JOB_NUM_NODES"])
@pytest.mark.parametrize("script", FIT_SCRIPTS, ids=[s.stem for s in FIT_SCRIPTS])
def test_fit_script_stops_when_the_allocation_differs_from_its_sizes(script, variable, tmp_path):
    slurm = allocation(script)
    slurm[variable] = str(int(slurm[variable]) + 1)  # e.g. sbatch --nodes=3 without NODES=3
    done = run_script(script, tmp_path, slurm)
    assert done.returncode == 1 and not (tmp_path / "argv").exists()
    assert ("GPUS_PER_NODE" if variable == "SLURM_NTASKS_PER_NODE" else "NODES=") in done.stderr


def test_fit_script_resumes_from_the_newest_checkpoint_and_passes_extra_arguments(tmp_path):
    script = SLURM_DIR / "fit_1node.sbatch"
    out = tmp_path / "out dir"  # a space in the path, too
    (out / "lightning_clipes" / "run1" / "checkpoints").mkdir(parents=True)
    hpc, last = out / "hpc_ckpt_1.ckpt", out / "lightning_clipes" / "run1" / "checkpoints" / "last.ckpt"
    hpc.write_bytes(b"")
    last.write_bytes(b"")
    os.utime(hpc, (1_000, 1_000))  # last.ckpt newer: preempted after the requeue, between two validations
    done = run_script(script, tmp_path, allocation(script), env={"OUT_DIR": str(out), "VENV": str(make_venv(tmp_path))},
                      args=["--trainer.max_steps", "7"])
    assert done.returncode == 0, done.stderr
    argv = recorded(tmp_path)
    assert argv[argv.index("--ckpt_path") + 1] == str(last) and argv[-2:] == ["--trainer.max_steps", "7"]
    assert not (tmp_path / "conda.txt").exists()  # VENV replaces CONDA_ENV
    os.utime(last, (500, 500))  # the usual case: the time limit came after the last validation
    run_script(script, tmp_path, allocation(script), env={"OUT_DIR": str(out), "VENV": str(make_venv(tmp_path))})
    argv = recorded(tmp_path)
    assert argv[argv.index("--ckpt_path") + 1] == str(hpc)


def make_venv(tmp_path: Path) -> Path:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    (venv / "bin" / "activate").write_text("export VENV_ACTIVATED=1\n")
    return venv


def test_sweep_agent_script_runs_wandb_agent_with_the_paths_and_without_slurm_process_management(tmp_path):
    script = SLURM_DIR / "sweep_agent.sbatch"
    opts = sbatch_options(script)
    assert opts["ntasks-per-node"] == "1" and opts["gres"].startswith("gpu:") and "array" in opts
    slurm = {"SLURM_JOB_NAME": "clipes-sweep", "SLURM_GPUS_ON_NODE": opts["gres"].split(":")[1]}
    done = run_script(script, tmp_path, slurm, env={"VOC_ROOT": "/data/VOC2012"}, args=["me/lightning_clipes/abc123"])
    assert done.returncode == 0, done.stderr
    argv = recorded(tmp_path)
    assert argv[:4] == ["agent", "--count", argv[2], "me/lightning_clipes/abc123"] and int(argv[2]) >= 1
    assert "SLURM_JOB_NAME=interactive" in argv and "VOC_ROOT=/data/VOC2012" in argv

    done = run_script(script, tmp_path, slurm)  # no sweep id
    assert done.returncode == 1 and "ENTITY/PROJECT/SWEEP_ID" in done.stderr
    done = run_script(script, tmp_path, {**slurm, "SLURM_GPUS_ON_NODE": "9"}, args=["me/p/abc"])
    assert done.returncode == 1 and "GPUS_PER_RUN" in done.stderr
