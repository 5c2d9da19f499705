#!/usr/bin/env bash
# A single-node Slurm 22.05 on this machine, with accounting (sacct) and an optional fake GPU, for tests and
# for trying `mmupt launch` for real; or (--nodes N) a cluster of N simulated nodes on this one machine. Run as
# root on Debian; nothing outside the state folder is touched (apart from `apt-get install` of slurm-wlm,
# munge, slurmdbd and mariadb-server when they are missing, and, with --nodes, the network namespaces below).
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
#
# Several nodes on one machine (--nodes N, 2..8; give the same --nodes to status / stop / env, or point
# MMUPT_SLURM_DIR at the state folder, default /tmp/mmupt-slurm-Nn, so it runs beside the single-node one):
#
#   bash scripts/local_slurm.sh start --nodes 2 [--gpus N]   # N fake GPUs on each node
#   eval "$(bash scripts/local_slurm.sh env --nodes 2)"      # SLURM_CONF, and PATH with the client wrappers
#   bash scripts/local_slurm.sh status --nodes 2; bash scripts/local_slurm.sh stop --nodes 2
#
# Each node mmupt-nI is a network namespace mmupt<ID>-nI (ID: a checksum of the state folder's path, so two
# state folders never share a name) with one veth, eth0 = $MMUPT_SLURM_SUBNET.(10+I)/24 (default subnet prefix
# 10.217.0), plugged into a bridge in the controller's namespace mmupt<ID>-ctl (br0 = .1, hostname
# mmupt-ctl), where mariadbd, slurmdbd and slurmctld run. Each node's slurmd (and so every job step on it) runs
# in its own UTS namespace (hostname mmupt-nI) and mount namespace: a fresh tmpfs on /dev/shm, and
# $STATE/etc/hosts (the cluster's names) bound on /etc/hosts; the rest of the filesystem is shared, as a
# cluster file system is. No address is assigned in the host's namespace and the namespaces have no route out:
# nothing of the cluster is reachable from the host except through `ip netns exec`, which is what the client
# wrappers in $STATE/bin (sbatch, squeue, sacct, scancel, sinfo, srun, scontrol, ...) do when run on the host
# (inside a node they run the real command). One munged (a unix socket in $STATE/run, one key) serves all.
# `stop` kills every process left in those namespaces and deletes them (with their links and mounts).
set -euo pipefail

CMD=${1:-}
(($#)) && shift
ASKED_NODES=""   # --nodes N from the command line (any subcommand): picks the default state folder
for ((i = 1; i <= $#; i++)); do
    if [[ ${!i} == --nodes ]]; then j=$((i + 1)); ASKED_NODES=${!j:-missing}; fi
done
if [[ -n $ASKED_NODES && ! $ASKED_NODES =~ ^[1-8]$ ]]; then
    echo "local_slurm: error: --nodes must be 1..8, got '$ASKED_NODES'" >&2; exit 2
fi
if [[ -n ${MMUPT_SLURM_DIR:-} ]]; then
    STATE=$MMUPT_SLURM_DIR
elif [[ -n $ASKED_NODES && $ASKED_NODES != 1 ]]; then
    STATE=/tmp/mmupt-slurm-${ASKED_NODES}n
else
    STATE=/tmp/mmupt-slurm
fi
PORT=${MMUPT_SLURM_PORT:-16817}
CTLD_PORT=$PORT SLURMD_PORT=$((PORT + 1)) DBD_PORT=$((PORT + 2)) DB_PORT=$((PORT + 3))
CLUSTER=mmupt-local PARTITION=debug ACCOUNT=mmupt
ETC=$STATE/etc RUN=$STATE/run LOG=$STATE/log
export SLURM_CONF=$ETC/slurm.conf

# The mode of this state folder: what a running cluster was started with, else what the command line asks.
if [[ $CMD == start ]]; then NODES=${ASKED_NODES:-1}
elif [[ -s $STATE/nodes ]]; then NODES=$(cat "$STATE/nodes")
else NODES=${ASKED_NODES:-1}
fi
SUBNET=${MMUPT_SLURM_SUBNET:-10.217.0}
CTL_HOST=mmupt-ctl CTL_IP=$SUBNET.1
ID=$(($(printf %s "$(realpath -m "$STATE")" | cksum | cut -d' ' -f1) % 100000))
NS_CTL=mmupt$ID-ctl
NODE_NAMES=() NODE_NS=() NODE_IPS=()
if ((NODES > 1)); then
    for ((i = 0; i < NODES; i++)); do
        NODE_NAMES+=("mmupt-n$i") NODE_NS+=("mmupt$ID-n$i") NODE_IPS+=("$SUBNET.$((10 + i))")
    done
    DAEMONS=(munged mariadbd slurmdbd slurmctld "${NODE_NAMES[@]/#/slurmd-}")
else
    DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)   # start order; stop runs it backwards
fi
CLIENTS=(sbatch squeue sacct scancel sinfo srun salloc scontrol sacctmgr sstat sattach sbcast sprio sshare sreport sdiag)

die() { echo "local_slurm: error: $*" >&2; exit 1; }
trap 'echo "local_slurm: error: \"$BASH_COMMAND\" failed (line $LINENO; logs in $LOG)" >&2' ERR
note() { echo "local_slurm: $*"; }
multi() { ((NODES > 1)); }

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

# ---- where each daemon and client command runs: as it is (one node), or in its namespace (--nodes) ----

ctl() {  # ctl COMMAND...: a client command (scontrol, sinfo, sacctmgr, ...) where it reaches slurmctld
    if multi; then ip netns exec "$NS_CTL" "$@"; else "$@"; fi
}

ns_of() {  # ns_of DAEMON: the network namespace a daemon runs in (empty: the host's)
    multi || return 0
    case $1 in
        munged) ;;
        slurmd-*) local name=${1#slurmd-} i; for ((i = 0; i < NODES; i++)); do
                      [[ ${NODE_NAMES[i]} != "$name" ]] || echo "${NODE_NS[i]}"; done ;;
        *) echo "$NS_CTL" ;;
    esac
}

in_place() {  # in_place DAEMON: it runs in the network namespace it belongs to
    local ns pid
    ns=$(ns_of "$1")
    [[ -z $ns ]] && return 0
    pid=$(pid_of "$1")
    [[ -n $pid && -e /run/netns/$ns ]] || return 1
    [[ $(stat -L -c %i "/proc/$pid/ns/net" 2>/dev/null) == $(stat -L -c %i "/run/netns/$ns") ]]
}

PREFIX=()
prefix_for() {  # prefix_for DAEMON: PREFIX=( the command prefix that runs a command where DAEMON lives )
    # On the host: nothing. In a namespace: its own UTS namespace (hostname) and mount namespace (slave: nothing
    # mounted there reaches the host) holding /etc/hosts with the cluster's names and, on a node, a fresh /dev/shm.
    local ns host shm=0
    ns=$(ns_of "$1")
    PREFIX=()
    [[ -z $ns ]] && return 0
    case $1 in slurmd-*) host=${1#slurmd-}; shm=1 ;; *) host=$CTL_HOST ;; esac
    # (nsenter, not `ip netns exec`: that mounts a sysfs of its own over /sys, hiding the cgroup mounts slurmd needs)
    PREFIX=(nsenter --net="/run/netns/$ns" unshare --uts --mount --propagation slave -- sh -c '
        hostname "$1" && mount --bind "$2" /etc/hosts || exit 1
        if [ "$3" = 1 ]; then mount -t tmpfs -o mode=1777,size=50% "$4-shm" /dev/shm || exit 1; fi
        shift 4; exec "$@"' sh "$host" "$ETC/hosts" "$shm" "mmupt$ID")
}

# ---- the network of --nodes: namespaces, a bridge, veth pairs ----

NETNS_MARK=$STATE/run/netns-dir-made   # this script made /run/netns (ip netns add's mount): remove it at the end
MADE_NETNS=()

add_netns() {
    [[ -e /run/netns/$1 ]] && return 0
    if [[ ! -e $NETNS_MARK ]] && ! mountpoint -q /run/netns 2>/dev/null; then
        if [[ -d /run/netns ]]; then echo mount >"$NETNS_MARK"; else echo dir >"$NETNS_MARK"; fi
    fi
    ip netns add "$1"
    MADE_NETNS+=("$1")
}

net_up() {
    add_netns "$NS_CTL"
    ip -n "$NS_CTL" link set lo up
    ip -n "$NS_CTL" link show br0 >/dev/null 2>&1 || ip -n "$NS_CTL" link add br0 type bridge
    ip -n "$NS_CTL" -4 -o addr show dev br0 | grep -qF " $CTL_IP/24 " || ip -n "$NS_CTL" addr add "$CTL_IP/24" dev br0
    ip -n "$NS_CTL" link set br0 up
    local i ns
    for ((i = 0; i < NODES; i++)); do
        ns=${NODE_NS[i]}
        add_netns "$ns"
        ip -n "$ns" link set lo up
        if ! ip -n "$NS_CTL" link show "n$i" >/dev/null 2>&1 || ! ip -n "$ns" link show eth0 >/dev/null 2>&1; then
            ip -n "$NS_CTL" link del "n$i" 2>/dev/null || true   # (its other end: a namespace deleted by hand)
            ip -n "$ns" link del eth0 2>/dev/null || true
            ip -n "$NS_CTL" link add "n$i" type veth peer name eth0 netns "$ns"
        fi
        ip -n "$NS_CTL" link set "n$i" master br0 up
        ip -n "$ns" -4 -o addr show dev eth0 | grep -qF " ${NODE_IPS[i]}/24 " \
            || ip -n "$ns" addr add "${NODE_IPS[i]}/24" dev eth0
        ip -n "$ns" link set eth0 up
    done
}

kill_in_netns() {  # kill_in_netns NS: end every process left in a namespace (job steps, Ray, a client)
    local pids
    pids=$(ip netns pids "$1" 2>/dev/null || true)
    [[ -z $pids ]] && return 0
    note "ending processes left in $1: $(echo $pids)"
    kill $pids 2>/dev/null || true
    local deadline=$((SECONDS + 10))
    while [[ -n $(ip netns pids "$1" 2>/dev/null) ]] && ((SECONDS < deadline)); do sleep 0.2; done
    pids=$(ip netns pids "$1" 2>/dev/null || true)
    [[ -z $pids ]] || kill -9 $pids 2>/dev/null || true
    deadline=$((SECONDS + 5))
    while [[ -n $(ip netns pids "$1" 2>/dev/null) ]] && ((SECONDS < deadline)); do sleep 0.2; done
}

del_netns() {  # del_netns NS...: end what runs there and delete them (their veths, bridge and mounts go too)
    local ns
    for ns in "$@"; do
        [[ -e /run/netns/$ns ]] || continue
        kill_in_netns "$ns"
        ip netns del "$ns"
        note "deleted network namespace $ns"
    done
    # the /run/netns mount `ip netns add` made, once no namespace is left (ours or anyone's)
    if [[ -e $NETNS_MARK ]] && [[ -z $(ls -A /run/netns 2>/dev/null) ]]; then
        local made
        made=$(cat "$NETNS_MARK")
        while mountpoint -q /run/netns 2>/dev/null; do umount /run/netns || break; done
        [[ $made != dir ]] || rmdir /run/netns 2>/dev/null || true
        rm -f "$NETNS_MARK"
    fi
}

all_netns() { echo "${NODE_NS[@]}" "$NS_CTL"; }

# ---- install, configure ----

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
    # the settings that differ between one node and --nodes N (the single node's are as they always were)
    local title="a single-node cluster" ctl_host=$node ctl_addr=127.0.0.1 dbd_addr=127.0.0.1
    local slurmd_spool=$STATE/slurmd slurmd_pid=$RUN/slurmd.pid slurmd_log=$LOG/slurmd.log nodes_expr=$node
    local node_lines gres_nodes=$node job_ids=""
    if multi; then
        title="$NODES simulated nodes (network namespaces)"
        ctl_host=$CTL_HOST ctl_addr=$CTL_IP dbd_addr=$CTL_IP
        slurmd_spool=$STATE/slurmd/%n slurmd_pid=$RUN/slurmd-%n.pid slurmd_log=$LOG/slurmd-%n.log
        nodes_expr=mmupt-n[0-$((NODES - 1))] gres_nodes=$nodes_expr
        memory=$((memory / NODES))   # the machine's memory shared out (its CPUs are not: each node has them all)
        # job ids of their own (>= 1000000), so what a job names after its id (Ray's /tmp/ray-mmupt-JOBID) does
        # not meet a job of the single-node cluster on this shared /tmp
        job_ids=$'\n'"FirstJobId=$(((ID % 9000 + 1000) * 1000))"
    fi
    node_line=$(sed -e "s/ RealMemory=[0-9]*/ RealMemory=$memory/" -e "s/^NodeName=[^ ]*/NodeName=$node/" <<<"$node_line")
    local gres_line="" gres_conf=""
    if ((gpus > 0)); then
        gres_line=" Gres=gpu:$gpus"
        mkdir -p "$STATE/dev"
        for ((i = 0; i < gpus; i++)); do
            [[ -c $STATE/dev/gpu$i ]] || mknod "$STATE/dev/gpu$i" c 1 3
        done
        gres_conf="NodeName=$gres_nodes Name=gpu File=$STATE/dev/gpu[0-$((gpus - 1))]"
    fi
    if multi; then
        node_lines=""
        for ((i = 0; i < NODES; i++)); do
            node_lines+="${node_line/#NodeName=$node/NodeName=${NODE_NAMES[i]}}$gres_line"
            node_lines+=" State=UNKNOWN NodeAddr=${NODE_IPS[i]}"$'\n'
        done
        node_lines=${node_lines%$'\n'}
        {
            printf '127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n%s %s\n' "$CTL_IP" "$CTL_HOST"
            for ((i = 0; i < NODES; i++)); do echo "${NODE_IPS[i]} ${NODE_NAMES[i]}"; done
        } >"$ETC/hosts"
    else
        node_lines="$node_line$gres_line State=UNKNOWN NodeAddr=127.0.0.1"
    fi
    cat >"$ETC/slurm.conf" <<EOF
# Written by scripts/local_slurm.sh: $title for mmupt-megatron's tests.
ClusterName=$CLUSTER
SlurmctldHost=$ctl_host($ctl_addr)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$RUN/munge.socket
CredType=cred/munge
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$slurmd_spool
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$slurmd_pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$slurmd_log
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
AccountingStorageHost=$dbd_addr
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$RUN/munge.socket
GresTypes=gpu
SlurmctldTimeout=30
SlurmdTimeout=60
KillWait=5
MinJobAge=300$job_ids
$node_lines
PartitionName=$PARTITION Nodes=$nodes_expr Default=YES MaxTime=INFINITE State=UP
EOF
    echo "$gres_conf" >"$ETC/gres.conf"
    : >"$ETC/plugstack.conf"
    cat >"$ETC/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$RUN/munge.socket
DbdHost=$ctl_host
DbdAddr=$dbd_addr
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

write_wrappers() {  # $STATE/bin: the client commands, run in the controller's namespace when called on the host
    mkdir -p "$STATE/bin"
    local tool real
    for tool in "${CLIENTS[@]}"; do
        real=$(command -v "$tool") || continue
        cat >"$STATE/bin/$tool.tmp" <<EOF
#!/bin/sh
# Written by scripts/local_slurm.sh: $tool for the $NODES-node cluster in $STATE. On the host it runs in the
# controller's network namespace ($NS_CTL), which reaches every node; inside a namespace (a job on a node) as it is.
export SLURM_CONF='$SLURM_CONF'
if [ -n "\$(ip netns identify 2>/dev/null)" ]; then exec '$real' "\$@"; fi
exec ip netns exec '$NS_CTL' '$real' "\$@"
EOF
        chmod 755 "$STATE/bin/$tool.tmp" && mv -f "$STATE/bin/$tool.tmp" "$STATE/bin/$tool"
    done
}

# ---- the daemons ----

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
    prefix_for mariadbd
    "${PREFIX[@]}" setsid mariadbd --no-defaults --datadir="$STATE/mariadb" --user=root --bind-address=127.0.0.1 --port="$DB_PORT" \
        --socket="$RUN/mariadb.socket" --pid-file="$RUN/mariadbd.pid" --log-error="$LOG/mariadb.log" \
        --innodb-buffer-pool-size=64M --skip-name-resolve </dev/null >/dev/null 2>&1 &
    wait_for 60 "MariaDB start" sql -e "SELECT 1"
    sql -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'mmupt-local';
            GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
}

start_slurmdbd() {
    prefix_for slurmdbd
    "${PREFIX[@]}" slurmdbd
    wait_for 60 "slurmdbd start" ctl sacctmgr -n list cluster
    # (read each list whole: `grep -q` on a pipe would stop sacctmgr early and fail the pipeline)
    local listed
    listed=$(ctl sacctmgr -n -P list cluster format=cluster)
    grep -qxF "$CLUSTER" <<<"$listed" || ctl sacctmgr -i add cluster "$CLUSTER" >/dev/null
    listed=$(ctl sacctmgr -n -P list account format=account)
    grep -qxF "$ACCOUNT" <<<"$listed" \
        || ctl sacctmgr -i add account "$ACCOUNT" cluster="$CLUSTER" description=mmupt-tests organization=mmupt >/dev/null
    listed=$(ctl sacctmgr -n -P list assoc format=account,user)
    grep -qxF "$ACCOUNT|root" <<<"$listed" || ctl sacctmgr -i add user root account="$ACCOUNT" >/dev/null
}

start_slurmctld() { prefix_for slurmctld; "${PREFIX[@]}" slurmctld; wait_for 60 "slurmctld start" ctl scontrol ping; }
start_slurmd() { slurmd; }

start_daemon() {  # start_daemon DAEMON
    case $1 in
        slurmd-*) mkdir -p "$STATE/slurmd/${1#slurmd-}"; prefix_for "$1"; "${PREFIX[@]}" slurmd
                  wait_for 30 "slurmd of ${1#slurmd-} writing $RUN/$1.pid" alive "$1" ;;
        *) "start_$1" ;;
    esac
}

nodes_idle() {  # every node is up (idle, mixed or allocated)
    local states
    states=$(ctl sinfo -h -N -o %T 2>/dev/null) || return 1
    if ! multi; then [[ $(head -1 <<<"$states") =~ ^(idle|mixed|allocated)$ ]]; return; fi
    (($(grep -cE '^(idle|mixed|allocated)$' <<<"$states") == NODES))
}

kill_daemon() {  # kill_daemon DAEMON...: TERM them together, KILL what is left after 30 s; their pid files go
    local daemon pid pids=() names=()
    for daemon in "$@"; do
        pid=$(pid_of "$daemon")
        if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
            kill "$pid" && pids+=("$pid") && names+=("$daemon ($pid)")
        fi
    done
    local deadline=$((SECONDS + 30))
    for pid in "${pids[@]}"; do
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    done
    ((${#names[@]} == 0)) || note "stopped ${names[*]}"
    for daemon in "$@"; do rm -f "$RUN/$daemon.pid"; done
}

STARTED=() START_DONE=""

start_failed() {  # EXIT trap of start: a start that fails stops the daemons and namespaces it made itself
    [[ -n $START_DONE ]] && return 0
    trap - ERR
    echo "local_slurm: start failed; stopping what it started: ${STARTED[*]:-no daemon} ${MADE_NETNS[*]:-}" >&2
    for ((i = ${#STARTED[@]} - 1; i >= 0; i--)); do kill_daemon "${STARTED[i]}" || true; done
    ((${#MADE_NETNS[@]} == 0)) || del_netns "${MADE_NETNS[@]}" || true
}

start() {
    local gpus=0
    while (($#)); do
        case $1 in
            --gpus) gpus=${2:?--gpus needs a number}; shift 2 ;;
            --nodes) shift 2 ;;   # read above
            *) die "start: unknown argument $1 (use --gpus N, --nodes N)" ;;
        esac
    done
    [[ $gpus =~ ^[0-9]+$ ]] || die "--gpus must be a whole number, got $gpus"
    [[ $(id -u) == 0 ]] || die "run as root (the daemons run as root)"
    if multi; then
        [[ $SUBNET =~ ^(10\.[0-9]{1,3}|172\.(1[6-9]|2[0-9]|3[01])|192\.168)\.[0-9]{1,3}$ ]] \
            || die "MMUPT_SLURM_SUBNET must be the first three numbers of a private /24 (like 10.217.0), got $SUBNET"
        ((${#STATE} <= 80)) || die "the state folder's path is too long for the sockets in it ($STATE)"
    fi
    mkdir -p "$STATE" "$ETC" "$RUN" "$LOG" "$STATE/slurmctld" "$STATE/slurmd"
    chmod 700 "$STATE"
    install_if_missing
    local was_nodes
    was_nodes=$(cat "$STATE/nodes" 2>/dev/null || echo 1)
    if alive slurmctld && [[ $was_nodes != "$NODES" ]]; then
        die "$STATE already runs a $was_nodes-node cluster; run 'stop' first (or use another MMUPT_SLURM_DIR to run both)"
    fi
    if alive slurmctld && [[ $(cat "$STATE/gpus" 2>/dev/null) != "$gpus" ]]; then
        die "already running with --gpus $(cat "$STATE/gpus"); run 'stop' first to change it"
    fi
    trap start_failed EXIT
    if multi; then
        command -v unshare >/dev/null && command -v ip >/dev/null || die "--nodes needs ip (iproute2) and unshare (util-linux)"
        # a daemon of ours outside its namespace (one deleted by hand) cannot reach the others: start it again
        for daemon in "${DAEMONS[@]}"; do
            if alive "$daemon" && ! in_place "$daemon"; then note "$daemon is not in its namespace"; kill_daemon "$daemon"; fi
        done
        net_up
    fi
    echo "$NODES" >"$STATE/nodes"
    alive slurmctld || write_configs "$gpus"
    ! multi || write_wrappers
    for daemon in "${DAEMONS[@]}"; do
        if ! alive "$daemon"; then
            STARTED+=("$daemon")
            start_daemon "$daemon"
        fi
    done
    if multi; then
        wait_for 60 "nodes ${NODE_NAMES[*]} becoming idle" nodes_idle
    else
        wait_for 60 "node $(hostname -s) becoming idle" nodes_idle
    fi
    START_DONE=1
    note "running (${STARTED[*]:-all were already up}); gpus=$gpus; state in $STATE"
    if multi; then
        for ((i = 0; i < NODES; i++)); do note "node ${NODE_NAMES[i]}: ${NODE_IPS[i]} (netns ${NODE_NS[i]})"; done
        note "controller $CTL_HOST: $CTL_IP (netns $NS_CTL)"
        note "export SLURM_CONF=$SLURM_CONF PATH=$STATE/bin:\$PATH"
    else
        note "export SLURM_CONF=$SLURM_CONF"
    fi
}

stop() {
    if alive slurmctld; then
        local jobs
        jobs=$(ctl squeue -h -o %i 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            note "cancelling jobs: $(echo $jobs)"
            ctl scancel $jobs || true
            local deadline=$((SECONDS + 60))
            while [[ -n $(ctl squeue -h -o %i 2>/dev/null) ]] && ((SECONDS < deadline)); do sleep 1; done
        fi
    fi
    if multi; then kill_daemon "${NODE_NAMES[@]/#/slurmd-}"; fi   # the nodes' slurmd together
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
        kill_daemon "${DAEMONS[i]}"
    done
    if multi; then
        del_netns $(all_netns)
    fi
}

status() {
    local down=0
    for daemon in "${DAEMONS[@]}"; do
        if alive "$daemon"; then echo "$daemon: running (pid $(pid_of "$daemon"))"; else echo "$daemon: stopped"; down=1; fi
    done
    if multi; then
        local ns addr host
        for ns in "$NS_CTL" "${NODE_NS[@]}"; do
            if [[ -e /run/netns/$ns ]]; then
                addr=$(ip -n "$ns" -4 -o addr show scope global | awk '{print $2, $4}' | tr '\n' ' ')
                echo "netns $ns: ${addr:-no address}"
            else
                echo "netns $ns: missing"; down=1
            fi
        done
        for ((i = 0; i < NODES; i++)); do
            host=""
            alive "slurmd-${NODE_NAMES[i]}" && host=$(nsenter -t "$(pid_of "slurmd-${NODE_NAMES[i]}")" -u hostname 2>/dev/null || true)
            echo "node ${NODE_NAMES[i]}: ${NODE_IPS[i]}, hostname ${host:-?}, slurmd $(alive "slurmd-${NODE_NAMES[i]}" && echo running || echo stopped)"
        done
    fi
    if alive slurmctld; then
        ctl sinfo -N -o "%N %T %c %m %G" || true
        ctl squeue || true
    fi
    env_lines
    return $down
}

env_lines() {
    echo "export SLURM_CONF=$SLURM_CONF"
    if multi; then echo "export PATH=\"$STATE/bin:\$PATH\""; fi
}

case $CMD in
    start) start "$@" ;;
    stop) stop ;;
    status) status || exit 1 ;;
    env) env_lines ;;
    *) echo "usage: $0 start [--gpus N] [--nodes N] | stop [--nodes N] | status [--nodes N] | env [--nodes N]" >&2; exit 2 ;;
esac
