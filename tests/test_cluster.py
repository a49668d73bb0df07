"""SLURM without a cluster: Lightning's SLURM detection under simulated job variables, the auto-requeue cycle
(SIGUSR1 -> hpc checkpoint + `scontrol requeue` -> the requeued job resumes), and the sbatch scripts of
experiments/slurm/ run by bash with stand-ins for srun, conda and wandb, their command lines parsed by the CLI."""
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.plugins.environments import LightningEnvironment, SLURMEnvironment

from lightning_clipes.cli import cli_main

REPO = Path(__file__).resolve().parents[1]
SLURM_DIR = REPO / "experiments" / "slurm"
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


def test_sigusr1_saves_an_hpc_checkpoint_requeues_and_the_requeued_job_resumes(tmp_path, monkeypatch):
    """The cycle the sbatch scripts rely on, with `scontrol` a stand-in that records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub(bin_dir / "scontrol", 'echo "$@" >> "$SCONTROL_RECORD"')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SCONTROL_RECORD", str(tmp_path / "scontrol.txt"))
    simulate_slurm(monkeypatch, nodes=1, tasks_per_node=1, node=0, local=0)
    root = tmp_path / "out"

    class TimeLimitNear(Callback):  # what SLURM does 90 s before the limit with --signal=SIGUSR1@90
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 3:  # without Lightning's handler SIGUSR1 would end pytest itself
                assert signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, None), "auto-requeue is off"
                os.kill(os.getpid(), signal.SIGUSR1)

    class FirstStep(Callback):
        def on_train_start(self, trainer, *args):
            self.step = trainer.global_step

    common = dict(accelerator="cpu", devices=1, default_root_dir=root, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False)
    Trainer(max_steps=5, callbacks=[TimeLimitNear()], **common).fit(BoringModel())
    assert sorted(p.name for p in root.iterdir()) == ["hpc_ckpt_1.ckpt"]
    assert torch.load(root / "hpc_ckpt_1.ckpt", weights_only=False)["global_step"] == 3
    assert (tmp_path / "scontrol.txt").read_text().split() == ["requeue", JOB_ID]

    first = FirstStep()  # the requeued job: same job id, same default_root_dir, no ckpt_path
    requeued = Trainer(max_steps=6, callbacks=[first], **common)
    requeued.fit(BoringModel())
    assert (first.step, requeued.global_step) == (3, 6)


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

    monkeypatch.chdir(REPO)  # the script runs clipes in the repository (configs are relative to it)
    with pytest.raises(SystemExit) as exit_:
        cli_main([*clipes_args, "--print_config"])
    out = capsys.readouterr()
    assert exit_.value.code == 0, out.err[-3000:]
    config = yaml.safe_load(out.out)
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
    assert data["root"] == str(REPO / "data" / "VOC2012")
    assert data["store_dir"] == str(REPO / "outputs" / "pseudo_labels")
    assert data["labeler"]["init_args"]["pretrained"] == str(REPO / "weights" / "ViT-B-16.pt")


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
