"""The project's own experiments/slurm/fit_1node.sbatch on a real SLURM: 2 CPU tasks train the synthetic
experiment with DDP (gloo), SIGUSR1 arrives during training, Lightning saves hpc_ckpt_1.ckpt and requeues the
job, and the requeued job resumes at the saved step without labelling anything again.

Needs `sbatch` and a controller that answers (skipped otherwise): `sudo experiments/slurm/local_cluster.sh` makes a
one-node cluster on this machine. On a real cluster, run from a filesystem the compute nodes see
(`pytest -m slurm --basetemp=$HOME/clipes-slurm-test`) and give the partition in CLIPES_SLURM_SBATCH_ARGS
(e.g. "--partition=cpu --account=me"). Takes a few minutes on 2 cores.
"""
import json
import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "slurm" / "fit_1node.sbatch"
MAX_STEPS, VAL_EVERY = 160, 40
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}
GIVE_UP_S = 1800  # against a hang only; the run takes a few minutes


def slurm_problem() -> str:
    """Why no job can be submitted here, or '' when sbatch and a controller are there."""
    if shutil.which("sbatch") is None:
        return "no sbatch: start a one-node cluster with `sudo experiments/slurm/local_cluster.sh`"
    try:
        subprocess.run(["sinfo", "-h"], check=True, capture_output=True, text=True, timeout=30)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
        why = (getattr(error, "stderr", "") or str(error)).strip()
        return f"sbatch is installed but no SLURM controller answers ({why})"
    return ""


pytestmark = pytest.mark.slurm


@pytest.fixture(autouse=True)
def slurm_cluster():
    """Skip where no job can be submitted (asked only when a test of this file runs, not at collection)."""
    if problem := slurm_problem():
        pytest.skip(problem)


def job_info(job: str) -> dict:
    """`scontrol show job` as a dict (JobState, Restarts, ...); finished jobs stay there for MinJobAge."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for(what: str, done, job: str, log: Path) -> None:
    """Poll ``done()`` once a second; fail with the job's log when the job ends first or after GIVE_UP_S."""
    deadline = time.monotonic() + GIVE_UP_S
    while not done():
        state = job_info(job).get("JobState", "?")
        tail = log.read_text()[-4000:] if log.exists() else "(no log)"
        assert state not in FINISHED, f"job {job} is {state} while waiting for {what}; log:\n{tail}"
        assert time.monotonic() < deadline, f"gave up waiting for {what} (job {job} is {state}); log:\n{tail}"
        time.sleep(1)


def pass_logs(store: Path) -> dict[str, list]:
    """What each rank labelled in each labelling pass: the ``labelled`` list of every ``rank<r>_of<n>.json`` under the
    store's ``passes/`` (one file per rank, per pass or rewritten by each pass), keyed by its path in the store."""
    return {str(p.relative_to(store)): json.loads(p.read_text())["labelled"]
            for p in sorted(store.glob("*/passes/**/rank*_of*.json"))}


def test_fit_job_requeued_by_sigusr1_resumes_at_the_saved_step_without_labelling_again(tmp_path):
    out, store, log = tmp_path / "out", tmp_path / "store", tmp_path / "job.out"
    env = {
        **os.environ, "REPO_DIR": str(REPO), "CONFIG": "experiments/synthetic.yaml", "NODES": "1", "GPUS_PER_NODE": "2",
        "CONDA_ENV": "", "VENV": "", "OUT_DIR": str(out), "STORE_DIR": str(store),
        "DATA_ROOT": str(tmp_path / "VOC2012"), "CLIP_WEIGHTS": "", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
    }
    # command-line options replace the script's #SBATCH lines: 2 CPU tasks instead of 4 GPUs
    sbatch = ["sbatch", "--parsable", "--job-name=clipes-slurm-test", f"--output={log}", "--gres=none",
              "--ntasks-per-node=2", "--cpus-per-task=1", "--mem=8G", "--time=60",
              *shlex.split(os.environ.get("CLIPES_SLURM_SBATCH_ARGS", ""))]
    clipes = ["--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.max_steps", str(MAX_STEPS),
              "--trainer.val_check_interval", str(VAL_EVERY), "--trainer.check_val_every_n_epoch", "null",
              "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false"]
    submitted = subprocess.run([*sbatch, str(SCRIPT), *clipes], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    try:
        # training has passed its first validation (so the labelling pass is over): time limit near
        wait_for("the first last.ckpt", lambda: any(out.rglob("last.ckpt")), job, log)
        first_pass = pass_logs(store)
        subprocess.run(["scancel", "--signal=USR1", job], check=True)  # the job steps' tasks, as --signal=USR1@90
        wait_for("the requeued job to finish",
                 lambda: job_info(job).get("JobState") in FINISHED and job_info(job).get("Restarts") != "0", job, log)
    finally:
        if job_info(job).get("JobState") not in FINISHED:
            subprocess.run(["scancel", job])
    info, text = job_info(job), log.read_text()
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "1"), text[-4000:]

    # the first run labelled the training images, each on one rank
    assert sorted(Path(name).name for name in first_pass) == ["rank0_of2.json", "rank1_of2.json"], first_pass
    first_labelled = [image for images in first_pass.values() for image in images]
    assert first_labelled and len(first_labelled) == len(set(first_labelled))
    # SIGUSR1 -> Lightning saved hpc_ckpt_1 and requeued; SLURM killed the job and started it again
    hpc = out / "hpc_ckpt_1.ckpt"
    saved_step = torch.load(hpc, map_location="cpu", weights_only=False)["global_step"]
    assert VAL_EVERY <= saved_step < MAX_STEPS
    assert "Handling auto-requeue signal" in text and "DUE TO JOB REQUEUE" in text, text[-4000:]
    # the requeued job: the script found the hpc checkpoint, Lightning resumed at its step, the pass labelled nothing
    assert re.findall(r"resuming from (\S+)", text) == [str(hpc)], text[-4000:]
    assert f"Resumed at global step {saved_step} from {hpc}" in text, text[-4000:]
    resumed_pass = {name: images for name, images in pass_logs(store).items() if first_pass.get(name) != images}
    assert sorted(Path(name).name for name in resumed_pass) == ["rank0_of2.json", "rank1_of2.json"], resumed_pass
    assert all(images == [] for images in resumed_pass.values()), resumed_pass
    # ... and trained to the end: last.ckpt of the resumed run at max_steps, one hpc checkpoint left
    last = max(out.rglob("last.ckpt"), key=lambda p: p.stat().st_mtime)
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == MAX_STEPS
    assert sorted(p.name for p in out.glob("hpc_ckpt_*.ckpt")) == ["hpc_ckpt_1.ckpt"]
