#!/bin/bash
# A one-node SLURM cluster on this machine, for tests/test_slurm_cluster.py (and for trying the sbatch scripts):
# slurmctld + slurmd + munged from Debian/Ubuntu packages, one partition "debug" with the machine's real CPU count
# and memory, cons_tres selection, requeue allowed, --signal delivered by slurmd. Needs root (a CI container or a VM,
# not a machine that already belongs to a cluster).
#   sudo experiments/slurm/local_cluster.sh          # install (apt-get) if needed, configure, start; ~40 s
#   sudo experiments/slurm/local_cluster.sh stop     # stop the daemons this script started
# Writes /etc/slurm/slurm.conf (refuses to replace one it did not write), /var/spool/slurm{ctld,d}, /var/log/slurm.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARK="# written by lightning_clipes experiments/slurm/local_cluster.sh"
PARTITION=debug
LOG_DIR=/var/log/slurm
RUN_DIR=/run/slurm

die() {
    echo "ERROR: $*" >&2
    exit 1
}

stop() {  # stop [munge]: the SLURM daemons this script started (their pid files), and munged too when asked
    local pidfile pid
    for pidfile in "$RUN_DIR/slurmd.pid" "$RUN_DIR/slurmctld.pid" ${1:+/run/munge/munged.pid}; do
        [[ -f "$pidfile" ]] || continue
        pid=$(cat "$pidfile")
        if kill "$pid" 2>/dev/null; then
            # a daemon takes a few seconds to let go of its port; a new one started before that dies at once
            for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
            kill -0 "$pid" 2>/dev/null && die "$(basename "$pidfile" .pid) (pid $pid) did not stop within 30 s."
            echo "stopped $(basename "$pidfile" .pid) (pid $pid)"
        fi
        rm -f "$pidfile"
    done
}

[[ $EUID -eq 0 ]] || die "run as root (sudo $0): it installs packages, writes $CONF and starts daemons."
case "${1:-start}" in
    stop) stop munge; exit 0 ;;
    start) ;;
    *) die "unknown command '$1'; use: $0 [start|stop]" ;;
esac

if [[ -f "$CONF" ]] && ! grep -qF "$MARK" "$CONF"; then
    die "$CONF exists and was not written by this script: this machine already has a SLURM setup." \
        "Use that cluster (sbatch works there), or move $CONF away to make a local test cluster."
fi

# --- packages
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null || die "slurmctld/slurmd/munged are missing and there is no apt-get;" \
                                         "install SLURM and MUNGE with your package manager first."
    echo "installing slurm-wlm and munge (apt-get)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi

# --- munge: one key, the daemon running as the munge user
if [[ ! -s /etc/munge/munge.key ]]; then
    mungekey --create --keyfile /etc/munge/munge.key 2>/dev/null \
        || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge /var/log/munge /var/lib/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
    munge -n | unmunge >/dev/null || die "munged does not answer; see /var/log/munge/munged.log."
fi

# --- slurm.conf from what slurmd finds on this machine (CPUs, sockets, cores, threads, memory)
HOST=$(hostname -s)
getent hosts "$HOST" >/dev/null || die "the host name $HOST does not resolve; add '127.0.0.1 $HOST' to /etc/hosts."
NODE=$(slurmd -C | head -n 1)  # NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ... RealMemory=24105
[[ "$NODE" == "NodeName=$HOST "* ]] || die "slurmd -C printed '$NODE', not a node line for $HOST."
install -d "$RUN_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd "$(dirname "$CONF")"
cat > "$CONF" <<EOF
$MARK
ClusterName=clipes-local
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued job may start again cred_expire + 1 s after the requeue (default 121 s), and then waits for the next
# scheduling pass (sched_interval, default 60 s): about 12 s instead of 2-3 min
AuthInfo=cred_expire=10
SchedulerParameters=sched_interval=5,bf_interval=5
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
# no cgroups needed: processes tracked by parent id, no CPU binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobRequeue=1
ReturnToService=2
# SIGTERM -> SIGKILL after KillWait; finished jobs stay visible to scontrol for MinJobAge seconds
KillWait=10
MinJobAge=600
$NODE State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF

# --- SLURM daemons (a second start replaces the ones this script started before; -c: forget old jobs)
stop >/dev/null
if timeout 5 scontrol ping 2>/dev/null | grep -q UP; then
    die "a slurmctld that this script did not start (no pid in $RUN_DIR) still answers; stop it first."
fi
slurmctld -c -f "$CONF"
slurmd -f "$CONF"
deadline=$((SECONDS + 30))
while ((SECONDS < deadline)); do
    state=$(timeout 5 sinfo -h -p "$PARTITION" -o %T 2>/dev/null || true)
    [[ "$state" == idle ]] && break
    if [[ "$state" == down* || "$state" == drain* ]]; then
        scontrol update nodename="$HOST" state=resume 2>/dev/null || true
    fi
    sleep 0.5
done
[[ "$state" == idle ]] || die "node $HOST is '${state:-unknown}', not idle, after 30 s;" \
                              "see $LOG_DIR/slurmctld.log and $LOG_DIR/slurmd.log."
echo "SLURM $(sinfo --version | cut -d' ' -f2) up: partition $PARTITION, $NODE"
echo "logs: $LOG_DIR/; stop with: $0 stop"
