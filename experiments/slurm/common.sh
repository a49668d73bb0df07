# shellcheck shell=bash
# Helpers sourced by the *.sbatch scripts in this folder (not submitted by itself).
# Every function prints what went wrong and how to fix it, then exits the job with status 1.

die() {
    echo "ERROR: $*" >&2
    exit 1
}

# cd to the repository (configs are given relative to it) and check that it is one.
enter_repo() {
    if ! cd "$REPO_DIR" 2>/dev/null || [[ ! -d lightning_clipes || ! -d experiments ]]; then
        die "REPO_DIR=$REPO_DIR is not the lightning_clipes repository (no lightning_clipes/ and experiments/ there);" \
            "submit from the repository root or set REPO_DIR."
    fi
}

# Activate VENV (a virtualenv directory) when it is set, else the conda environment CONDA_ENV.
activate_env() {
    if [[ -n "${VENV:-}" ]]; then
        [[ -f "$VENV/bin/activate" ]] || die "VENV=$VENV has no bin/activate; make it with python -m venv \"$VENV\"."
        set +u
        # shellcheck disable=SC1091
        source "$VENV/bin/activate"
        set -u
    elif [[ -n "${CONDA_ENV:-}" ]]; then
        command -v conda >/dev/null || die "conda is not on PATH (module load a conda/miniforge module first)," \
                                           "or set VENV to a virtualenv directory instead of CONDA_ENV," \
                                           "or CONDA_ENV= (empty) to use the environment sbatch was called from."
        set +u  # activation scripts of conda packages read unset variables
        eval "$(conda shell.bash hook)"
        conda activate "$CONDA_ENV" || die "cannot activate conda environment '$CONDA_ENV'" \
                                           "(conda env create -f environment.yml makes 'lightning_clipes')."
        set -u
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
# --trainer.default_root_dir when SLURM sends SIGUSR1 before the time limit (lightning_clipes.cluster.RequeueCheckpoints
# keeps only the newest); last.ckpt is lightning_clipes.cluster.LastCheckpoint's (every validation and the end of
# training, trainer_default.yaml), the only one left after a preemption, which sends SIGTERM instead.
newest_checkpoint() {
    local dir=$1
    [[ -d "$dir" ]] || return 0
    find "$dir" -type f \( -name 'hpc_ckpt_*.ckpt' -o -name 'last.ckpt' \) -printf '%T@ %p\n' \
        | sort -n | tail -n 1 | cut -d' ' -f2-
}

# The script's CONFIG, sizes, folders and store would be silently replaced by a -c/--config among the extra
# arguments (jsonargparse applies the arguments in order); the experiment is chosen with CONFIG instead.
refuse_config_arguments() {
    local arg
    for arg in "$@"; do
        case "$arg" in
            -c | -c=* | --config | --config=*)
                die "'$arg' among the arguments of the script would override its CONFIG, devices, output folder" \
                    "and store; choose the experiment with CONFIG instead: CONFIG=experiments/coco.yaml sbatch ..." ;;
        esac
    done
}

# One training job: srun starts one `clipes fit` per task (GPU); every task labels its share of the train split
# into STORE_DIR, then DDP trains the student. Reads the variables of the fit_*.sbatch scripts; "$@" is appended.
# shellcheck disable=SC2153  # NODES, GPUS_PER_NODE, CONFIG, ...: set by the sbatch script that sources this file
run_fit() {
    refuse_config_arguments "$@"
    check_allocation "$NODES" "$GPUS_PER_NODE"
    enter_repo
    [[ -f "$CONFIG" ]] || die "CONFIG=$CONFIG does not exist in $REPO_DIR; give a file of experiments/ (relative to" \
                              "the repository) or an absolute path."
    activate_env
    if [[ -n "${VOC_ROOT:-}" && -z "$DATA_ROOT" ]]; then
        echo "NOTE: VOC_ROOT=$VOC_ROOT is not read by the fit scripts (only by sweep_agent.sbatch); the data root is" \
             "the config's. Set DATA_ROOT=$VOC_ROOT to pass it as --data.root." >&2
    fi

    # srun (Slurm >= 22.05) does not inherit --cpus-per-task; a requeued job continues the same W&B run
    if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; fi
    export WANDB_RUN_ID="${WANDB_RUN_ID:-clipes-${SLURM_JOB_ID:-local}}" WANDB_RESUME=allow
    local resume
    resume=$(newest_checkpoint "$OUT_DIR")
    echo "$(date) job ${SLURM_JOB_ID:-?} on ${SLURM_JOB_NODELIST:-?}: $CONFIG, ${NODES} node(s) x ${GPUS_PER_NODE}" \
         "task(s), out $OUT_DIR${resume:+, resuming from $resume}"

    local args=(fit -c "$CONFIG" --trainer.devices "$GPUS_PER_NODE" --trainer.num_nodes "$NODES"
                --trainer.default_root_dir "$OUT_DIR" --trainer.logger.init_args.save_dir "$OUT_DIR"
                --data.store_dir "$STORE_DIR")
    if [[ -n "$DATA_ROOT" ]]; then args+=(--data.root "$DATA_ROOT"); fi
    if [[ -n "$CLIP_WEIGHTS" ]]; then args+=(--data.labeler.init_args.pretrained "$CLIP_WEIGHTS"); fi
    if [[ -n "$resume" ]]; then args+=(--ckpt_path "$resume"); fi
    srun --kill-on-bad-exit=1 clipes "${args[@]}" "$@"
}
