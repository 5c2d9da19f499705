#!/usr/bin/env bash
# A single-node Slurm 22.05 on this machine, with accounting (sacct) and an optional fake GPU, for tests and
# for trying `mmupt launch` for real. Run as root on Debian; nothing outside the state folder is touched
# (apart from `apt-get install` of slurm-wlm, munge, slurmdbd and mariadb-server when they are missing).
#
#   bash scripts/local_slurm.sh start [--gpus N]   # install if missing, start (idempotent), wait for an idle node
#   bash scripts/local_slurm.sh status             # daemons, node state, and the SLURM_CONF line to export
#   bash scripts/local_slurm.sh stop               # cancel jobs, stop every daemon; nothing is left running
#   eval "$(bash scripts/local_slurm.sh env)"      # point sbatch/squeue/sacct (and nemo-run) at this cluster
#
# Daemons (munged, mariadbd, slurmdbd, slurmctld, slurmd) run directly, without systemd, and are tracked by
# pid files. State, configs, logs and sockets live in $MMUPT_SLURM_DIR (default /tmp/mmupt-slurm); ports are
# $MMUPT_SLURM_PORT .. +3 (default 16817: slurmctld, slurmd, slurmdbd, MariaDB). --gpus N (default 0) adds N
# fake GPUs: GresTypes=gpu, Gres=gpu:N, gres.conf File= character devices (major 1, minor 3: /dev/null's).
set -euo pipefail

STATE=${MMUPT_SLURM_DIR:-/tmp/mmupt-slurm}
PORT=${MMUPT_SLURM_PORT:-16817}
CTLD_PORT=$PORT SLURMD_PORT=$((PORT + 1)) DBD_PORT=$((PORT + 2)) DB_PORT=$((PORT + 3))
CLUSTER=mmupt-local PARTITION=debug ACCOUNT=mmupt
ETC=$STATE/etc RUN=$STATE/run LOG=$STATE/log
export SLURM_CONF=$ETC/slurm.conf
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)   # start order; stop runs it backwards

die() { echo "local_slurm: error: $*" >&2; exit 1; }
trap 'echo "local_slurm: error: \"$BASH_COMMAND\" failed (line $LINENO; logs in $LOG)" >&2' ERR
note() { echo "local_slurm: $*"; }

pid_of() { [[ -s $RUN/$1.pid ]] && cat "$RUN/$1.pid" || true; }
alive() { local pid; pid=$(pid_of "$1"); [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local seconds=$1 what=$2; shift 2
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die "$what did not happen in ${seconds} s (logs: $LOG)"
        sleep 0.5
    done
}

install_if_missing() {
    local missing=()
    for tool in munged mariadbd mariadb-install-db slurmdbd slurmctld slurmd sbatch sacct sacctmgr; do
        command -v "$tool" >/dev/null || missing+=("$tool")
    done
    ((${#missing[@]} == 0)) && return
    [[ $(id -u) == 0 ]] || die "missing ${missing[*]}; run as root to install slurm-wlm, munge, slurmdbd, mariadb-server"
    note "installing slurm-wlm munge slurmdbd mariadb-server (missing: ${missing[*]})"
    # keep the packages' init scripts from starting system-wide daemons during the install
    local guard=""
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        guard=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\nexit 101\n' >"$guard" && chmod +x "$guard"
    fi
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurm-wlm slurm-client munge slurmdbd mariadb-server mariadb-client >"$STATE/apt.log" 2>&1 \
        || { [[ -n $guard ]] && rm -f "$guard"; die "apt-get install failed (see $STATE/apt.log)"; }
    [[ -n $guard ]] && rm -f "$guard"
    return 0
}

write_configs() {
    local gpus=$1 node cpus memory node_line
    node=$(hostname -s)
    node_line=$(slurmd -C | head -1)
    cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$node_line")
    memory=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$node_line")
    memory=$((memory * 95 / 100))   # a little under what slurmd measures, or the node is drained
    node_line=$(sed -e "s/ RealMemory=[0-9]*/ RealMemory=$memory/" -e "s/^NodeName=[^ ]*/NodeName=$node/" <<<"$node_line")
    local gres_line="" gres_conf=""
    if ((gpus > 0)); then
        gres_line=" Gres=gpu:$gpus"
        mkdir -p "$STATE/dev"
        for ((i = 0; i < gpus; i++)); do
            [[ -c $STATE/dev/gpu$i ]] || mknod "$STATE/dev/gpu$i" c 1 3
        done
        gres_conf="NodeName=$node Name=gpu File=$STATE/dev/gpu[0-$((gpus - 1))]"
    fi
    cat >"$ETC/slurm.conf" <<EOF
# Written by scripts/local_slurm.sh: a single-node cluster for mmupt-megatron's tests.
ClusterName=$CLUSTER
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$RUN/munge.socket
CredType=cred/munge
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
PlugStackConfig=$ETC/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
ReturnToService=2
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$RUN/munge.socket
GresTypes=gpu
SlurmctldTimeout=30
SlurmdTimeout=60
KillWait=5
MinJobAge=300
$node_line$gres_line State=UNKNOWN NodeAddr=127.0.0.1
PartitionName=$PARTITION Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
    echo "$gres_conf" >"$ETC/gres.conf"
    : >"$ETC/plugstack.conf"
    cat >"$ETC/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$RUN/munge.socket
DbdHost=$node
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=mmupt-local
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$ETC/slurmdbd.conf"
    echo "$gpus" >"$STATE/gpus"
}

sql() { mariadb --no-defaults --socket="$RUN/mariadb.socket" -u root "$@"; }

start_munged() {
    [[ -s $ETC/munge.key ]] || { dd if=/dev/urandom of="$ETC/munge.key" bs=1024 count=1 status=none; chmod 400 "$ETC/munge.key"; }
    munged --force --socket="$RUN/munge.socket" --key-file="$ETC/munge.key" --pid-file="$RUN/munged.pid" \
        --log-file="$LOG/munged.log" --seed-file="$STATE/munge.seed"
    wait_for 20 "munged start" test -S "$RUN/munge.socket"
}

start_mariadbd() {
    if [[ ! -d $STATE/mariadb/mysql ]]; then
        mariadb-install-db --no-defaults --datadir="$STATE/mariadb" --user=root --auth-root-authentication-method=normal \
            --skip-test-db >"$LOG/mariadb-install.log" 2>&1 || die "mariadb-install-db failed (see $LOG/mariadb-install.log)"
    fi
    # setsid: the server outlives this script; its pid file tracks it
    setsid mariadbd --no-defaults --datadir="$STATE/mariadb" --user=root --bind-address=127.0.0.1 --port="$DB_PORT" \
        --socket="$RUN/mariadb.socket" --pid-file="$RUN/mariadbd.pid" --log-error="$LOG/mariadb.log" \
        --innodb-buffer-pool-size=64M --skip-name-resolve </dev/null >/dev/null 2>&1 &
    wait_for 60 "MariaDB start" sql -e "SELECT 1"
    sql -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'mmupt-local';
            GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
}

start_slurmdbd() {
    slurmdbd
    wait_for 60 "slurmdbd start" sacctmgr -n list cluster
    # (read each list whole: `grep -q` on a pipe would stop sacctmgr early and fail the pipeline)
    local listed
    listed=$(sacctmgr -n -P list cluster format=cluster)
    grep -qxF "$CLUSTER" <<<"$listed" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
    listed=$(sacctmgr -n -P list account format=account)
    grep -qxF "$ACCOUNT" <<<"$listed" \
        || sacctmgr -i add account "$ACCOUNT" cluster="$CLUSTER" description=mmupt-tests organization=mmupt >/dev/null
    listed=$(sacctmgr -n -P list assoc format=account,user)
    grep -qxF "$ACCOUNT|root" <<<"$listed" || sacctmgr -i add user root account="$ACCOUNT" >/dev/null
}

start_slurmctld() { slurmctld; wait_for 60 "slurmctld start" scontrol ping; }
start_slurmd() { slurmd; }

node_idle() { [[ $(sinfo -h -N -o %T 2>/dev/null | head -1) =~ ^(idle|mixed|allocated)$ ]]; }

start() {
    local gpus=0
    while (($#)); do
        case $1 in
            --gpus) gpus=${2:?--gpus needs a number}; shift 2 ;;
            *) die "start: unknown argument $1 (use --gpus N)" ;;
        esac
    done
    [[ $gpus =~ ^[0-9]+$ ]] || die "--gpus must be a whole number, got $gpus"
    [[ $(id -u) == 0 ]] || die "run as root (the daemons run as root)"
    mkdir -p "$STATE" "$ETC" "$RUN" "$LOG" "$STATE/slurmctld" "$STATE/slurmd"
    chmod 700 "$STATE"
    install_if_missing
    if alive slurmctld && [[ $(cat "$STATE/gpus" 2>/dev/null) != "$gpus" ]]; then
        die "already running with --gpus $(cat "$STATE/gpus"); run 'stop' first to change it"
    fi
    alive slurmctld || write_configs "$gpus"
    local started=()
    for daemon in "${DAEMONS[@]}"; do
        if ! alive "$daemon"; then
            "start_$daemon"
            started+=("$daemon")
        fi
    done
    wait_for 60 "node $(hostname -s) becoming idle" node_idle
    note "running (${started[*]:-all were already up}); gpus=$gpus; state in $STATE"
    note "export SLURM_CONF=$SLURM_CONF"
}

stop() {
    if alive slurmctld; then
        local jobs
        jobs=$(squeue -h -o %i 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            note "cancelling jobs: $(echo $jobs)"
            scancel $jobs || true
            local deadline=$((SECONDS + 60))
            while [[ -n $(squeue -h -o %i 2>/dev/null) ]] && ((SECONDS < deadline)); do sleep 1; done
        fi
    fi
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
        local daemon=${DAEMONS[i]} pid
        pid=$(pid_of "$daemon")
        if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
            kill "$pid"
            local deadline=$((SECONDS + 30))
            while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
            kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
            note "stopped $daemon ($pid)"
        fi
        rm -f "$RUN/$daemon.pid"
    done
}

status() {
    local down=0
    for daemon in "${DAEMONS[@]}"; do
        if alive "$daemon"; then echo "$daemon: running (pid $(pid_of "$daemon"))"; else echo "$daemon: stopped"; down=1; fi
    done
    if alive slurmctld; then
        sinfo -N -o "%N %T %c %m %G" || true
        squeue || true
    fi
    echo "export SLURM_CONF=$SLURM_CONF"
    return $down
}

case ${1:-} in
    start) shift; start "$@" ;;
    stop) stop ;;
    status) status ;;
    env) echo "export SLURM_CONF=$SLURM_CONF" ;;
    *) echo "usage: $0 start [--gpus N] | stop | status | env" >&2; exit 2 ;;
esac
