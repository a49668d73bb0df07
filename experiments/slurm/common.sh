# Helpers sourced by the *.sbatch scripts in this folder (not submitted by itself).
# Every function prints what went wrong and how to fix it, then exits the job with status 1.

die() {
    echo "ERROR: $*" >&2
    exit 1
}

# cd to the repository (configs are given relative to it) and check that it is one.
enter_repo() {
    cd "$REPO_DIR" 2>/dev/null && [[ -f experiments/voc.yaml ]] \
        || die "REPO_DIR=$REPO_DIR is not the lightning_clipes repository (no experiments/voc.yaml there);" \
               "submit from the repository root or set REPO_DIR."
}

# Activate VENV (a virtualenv directory) when it is set, else the conda environment CONDA_ENV.
activate_env() {
    if [[ -n "${VENV:-}" ]]; then
        [[ -f "$VENV/bin/activate" ]] || die "VENV=$VENV has no bin/activate; make it with python -m venv \"$VENV\"."
        # shellcheck disable=SC1091
        source "$VENV/bin/activate"
    elif [[ -n "${CONDA_ENV:-}" ]]; then
        command -v conda >/dev/null || die "conda is not on PATH (module load a conda/miniforge module first)," \
                                           "or set VENV to a virtualenv directory instead of CONDA_ENV."
        eval "$(conda shell.bash hook)"
        conda activate "$CONDA_ENV" || die "cannot activate conda environment '$CONDA_ENV'" \
                                           "(conda env create -f environment.yml makes 'lightning_clipes')."
    fi
    command -v clipes >/dev/null \
        || die "the clipes command is not installed in this environment; run pip install -e . in it."
}

# Lightning takes the process layout from SLURM and refuses --trainer.devices/--trainer.num_nodes that differ
# from --ntasks-per-node/--nodes; check here, before the job queues for GPUs it will not use.
check_allocation() {
    local nodes=$1 gpus_per_node=$2
    [[ "${SLURM_NTASKS_PER_NODE:-}" == "$gpus_per_node" ]] \
        || die "SLURM gives ${SLURM_NTASKS_PER_NODE:-no} tasks per node but GPUS_PER_NODE=$gpus_per_node;" \
               "keep #SBATCH --ntasks-per-node and --gres=gpu:N equal to GPUS_PER_NODE (one task per GPU)."
    [[ "${SLURM_JOB_NUM_NODES:-}" == "$nodes" ]] \
        || die "SLURM gives ${SLURM_JOB_NUM_NODES:-no} nodes but NODES=$nodes; keep #SBATCH --nodes equal to NODES."
}

# Newest checkpoint of this run, or nothing. hpc_ckpt_<n>.ckpt is what Lightning writes into
# --trainer.default_root_dir when SLURM sends SIGUSR1 before the time limit; last.ckpt is ModelCheckpoint's
# (every validation), the only one left after a preemption, which sends SIGTERM instead.
newest_checkpoint() {
    local dir=$1
    [[ -d "$dir" ]] || return 0
    find "$dir" -type f \( -name 'hpc_ckpt_*.ckpt' -o -name 'last.ckpt' \) -exec ls -t {} + | head -n 1
}
