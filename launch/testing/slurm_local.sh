#!/usr/bin/env bash
# A throw-away one-node Slurm cluster on localhost, for testing launch/slurm.sbatch.
#
#   launch/testing/slurm_local.sh install        # apt-get install slurm-wlm munge (root, Debian/Ubuntu)
#   launch/testing/slurm_local.sh up DIR         # configure + start munged, slurmctld, slurmd under DIR
#   . DIR/env                                    # SLURM_CONF for sbatch/squeue/scontrol/scancel
#   launch/testing/slurm_local.sh down DIR       # stop the daemons started by `up DIR`
#
# Everything (config, state, spool, logs, pid files, the munge key and socket) lives under DIR, so
# nothing system-wide is touched except the installed packages. The node is described with the
# machine's real hostname, CPUs and memory (`slurmd -C`); no cgroups (containers rarely allow
# them): proctrack/linuxproc and task/none. Ports: $K2_SLURM_PORT (slurmctld) and +1 (slurmd).
set -euo pipefail

cmd=${1:-}
dir=${2:-}

die() { echo "slurm_local: $*" >&2; exit 1; }

install_packages() {
    command -v apt-get >/dev/null || die "apt-get not found: install slurm-wlm and munge with your package manager"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends slurm-wlm munge
}

up() {
    [[ -n $dir ]] || die "usage: $0 up DIR"
    for exe in munged mungekey slurmctld slurmd sbatch; do
        command -v "$exe" >/dev/null || die "$exe not found (run: $0 install)"
    done
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    chmod 700 "$dir"
    mkdir -p "$dir"/{munge,state,spool,log}
    chmod 700 "$dir/munge"

    # munge: a private key and socket; --force because we run as root in a temp dir.
    [[ -f $dir/munge/munge.key ]] || mungekey -c -k "$dir/munge/munge.key"
    chmod 600 "$dir/munge/munge.key"
    munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed"

    local host node port
    host=$(hostname -s)
    # "NodeName=vm CPUs=2 Boards=1 ... RealMemory=24105": the machine as slurmd itself sees it.
    node=$(slurmd -C | head -n1)
    [[ $node == NodeName=* ]] || die "slurmd -C printed no node line: $node"
    port=${K2_SLURM_PORT:-16817}
    cat >"$dir/slurm.conf" <<EOF
ClusterName=k2local
SlurmctldHost=$host
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/slurmd-%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=30
$node State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    echo "export SLURM_CONF=$dir/slurm.conf" >"$dir/env"
    export SLURM_CONF=$dir/slurm.conf

    slurmctld -f "$SLURM_CONF"
    slurmd -f "$SLURM_CONF"
    # Wait until the node accepts work (slurmd registers within a few seconds).
    local state=""
    for _ in $(seq 60); do
        state=$(sinfo -h -N -o %t 2>/dev/null | head -n1 || true)
        [[ $state == idle ]] && { echo "slurm_local: up (node $host idle, SLURM_CONF=$SLURM_CONF)"; return 0; }
        sleep 0.5
    done
    echo "slurm_local: node did not become idle (state '$state'); logs follow" >&2
    tail -n 20 "$dir"/log/*.log >&2 || true
    return 1
}

stop_pidfile() {
    local f=$1
    [[ -f $f ]] || return 0
    local pid
    pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$f"
}

down() {
    [[ -n $dir && -d $dir ]] || die "usage: $0 down DIR (an existing folder from 'up')"
    if [[ -f $dir/slurm.conf ]]; then
        # Cancel what is left so slurmd does not leave job processes behind.
        SLURM_CONF=$dir/slurm.conf scancel --user="$(id -un)" 2>/dev/null || true
    fi
    stop_pidfile "$dir/slurmd.pid"
    stop_pidfile "$dir/slurmctld.pid"
    stop_pidfile "$dir/munge/munged.pid"
}

case $cmd in
    install) install_packages ;;
    up) up ;;
    down) down ;;
    *) die "usage: $0 install | up DIR | down DIR" ;;
esac
