#!/usr/bin/env bash
# A one-node SLURM cluster with accounting on this machine, from Debian's packages: munge,
# MariaDB, slurmdbd, slurmctld and slurmd. Try the SLURM path (hydra/launcher=slurm, the
# `launcher:` param of dvc.yaml) here before you spend cluster time. Runs as root; safe to run
# again (it starts only what is not running). `make cluster` runs it, `make cluster-stop`
# stops the daemons (`scripts/cluster.sh stop`). Settings: README "Sweeps on SLURM".
set -euo pipefail

CLUSTER=dlilabs
NODE=$(hostname -s)
CONF=/etc/slurm
STATE=/var/lib/dlilabs-slurm          # slurmctld's and slurmd's state, the cluster's logs
DB_PASSWORD_FILE=$CONF/dlilabs-db.password

say() { echo "cluster: $*"; }
running() { pgrep -x "$1" >/dev/null; }

if [ "${1:-start}" = stop ]; then
    for daemon in slurmd slurmctld slurmdbd mariadbd munged; do
        pkill -x "$daemon" 2>/dev/null && say "stopped $daemon" || true
    done
    exit 0
fi

[ "$(id -u)" -eq 0 ] || { echo "error: scripts/cluster.sh sets up system daemons: run it as root" >&2; exit 2; }

# 1. Packages (about a minute the first time).
need=()
for pair in slurmctld:slurm-wlm slurmdbd:slurmdbd mariadbd:mariadb-server munged:munge; do
    command -v "${pair%%:*}" >/dev/null || [ -x "/usr/sbin/${pair%%:*}" ] || need+=("${pair#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
    say "installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

# 2. munge: the cluster's shared key; every daemon and client authenticates with it.
mkdir -p /etc/munge /run/munge /var/log/munge /var/lib/munge
[ -s /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
chmod 400 /etc/munge/munge.key
running munged || runuser -u munge -- /usr/sbin/munged

# 3. MariaDB for slurmdbd: submitit reads job states from `sacct`.
mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
[ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql >/dev/null
if ! running mariadbd; then
    (mariadbd --user=mysql >/var/log/mysql-dlilabs.log 2>&1 &)
fi
for _ in $(seq 60); do mariadb-admin ping >/dev/null 2>&1 && break; sleep 0.5; done
[ -s "$DB_PASSWORD_FILE" ] || (umask 077; head -c 18 /dev/urandom | base64 | tr -d '/+=' >"$DB_PASSWORD_FILE")
DB_PASSWORD=$(cat "$DB_PASSWORD_FILE")
mariadb -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASSWORD';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASSWORD';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"

# 4. Configuration: one node with this machine's cores and most of its memory.
mkdir -p "$CONF" "$STATE"/{ctld,d} /var/log/slurm
CPUS=$(nproc)
MEMORY_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
new_slurm_conf=$(cat <<EOF
# Written by dlilabs scripts/cluster.sh: a one-node test cluster.
ClusterName=$CLUSTER
SlurmctldHost=$NODE
SlurmUser=root
AuthType=auth/munge
# A requeued job waits cred_expire seconds before it starts again (120 by default): shorter
# here, so a test of preemption does not sit idle.
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
# Containers: no cgroups. Processes are tracked through /proc, memory sampled every 2 s
# and a job over its --mem is killed (OUT_OF_MEMORY), as a cgroup cluster would.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=2
JobAcctGatherParams=OverMemoryKill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
# Preemption and requeue: submitit's USR2 warning, jobs that come back after a requeue.
SlurmctldParameters=preempt_send_user_signal
JobRequeue=1
ReturnToService=2
KillWait=10
MinJobAge=600
NodeName=$NODE CPUs=$CPUS RealMemory=$MEMORY_MB State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
)
new_dbd_conf=$(cat <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=$STATE/slurmdbd.pid
LogFile=/var/log/slurm/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASSWORD
StorageLoc=slurm_acct_db
EOF
)
changed=false
if [ "$(cat $CONF/slurm.conf 2>/dev/null)" != "$new_slurm_conf" ]; then
    echo "$new_slurm_conf" >$CONF/slurm.conf && changed=true
fi
if [ "$(cat $CONF/slurmdbd.conf 2>/dev/null)" != "$new_dbd_conf" ]; then
    (umask 077; echo "$new_dbd_conf" >$CONF/slurmdbd.conf) && changed=true
fi
chmod 600 $CONF/slurmdbd.conf
if $changed; then  # daemons started with an older configuration start again
    for daemon in slurmd slurmctld slurmdbd; do pkill -x "$daemon" 2>/dev/null || true; done
    for _ in $(seq 40); do pgrep -x 'slurmd|slurmctld|slurmdbd' >/dev/null || break; sleep 0.25; done
fi

# 5. Daemons: accounting first (the cluster registers with it), then the controller, the node.
running slurmdbd || /usr/sbin/slurmdbd
for _ in $(seq 60); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.5; done
sacctmgr -n list cluster format=cluster%30 | grep -qw "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
sacctmgr -n list account format=account%30 | grep -qw dlilabs || sacctmgr -i add account dlilabs Cluster="$CLUSTER" >/dev/null
sacctmgr -n list user format=user%30 | grep -qw root || sacctmgr -i add user root Account=dlilabs >/dev/null
running slurmctld || /usr/sbin/slurmctld
for _ in $(seq 60); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.5; done
running slurmd || /usr/sbin/slurmd
for _ in $(seq 60); do
    sinfo -h -N -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)' && break
    sleep 0.5
done
state=$(sinfo -h -N -o %T 2>/dev/null | head -1)
case "$state" in
    idle|mixed|allocated) ;;
    down*|drain*) scontrol update nodename="$NODE" state=resume ;;
    *) echo "error: node $NODE is '${state:-unknown}': see /var/log/slurm/slurmd.log" >&2; exit 1 ;;
esac
say "up: node $NODE ($CPUS CPUs, $MEMORY_MB MB), partition debug, accounting in MariaDB; sinfo, squeue and sacct work"
