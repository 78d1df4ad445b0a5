#!/usr/bin/env bash
# A single-node SLURM cluster with accounting, on loopback, for the cluster tests (tests/test_cluster.py) and for
# trying the SLURM recipe on a laptop or in CI. Idempotent: installs what is missing, starts what is not running,
# then waits until the node takes jobs. Needs root and Debian/Ubuntu apt (tested on Debian 12, no systemd).
#
#   sudo tests/cluster/setup_slurm.sh            # then: sinfo; sacct; python -m src.run -m ... hydra/launcher=slurm_cpu
#
# What it sets up (the exact packages and configuration that work here):
#   packages   slurmctld slurmd slurm-client slurmdbd (22.05, Debian 12) munge mariadb-server
#   munge      the key the munge package generates (/etc/munge/munge.key); munged runs as user munge
#   accounting MariaDB (database slurm_acct_db, user slurm) <- slurmdbd <- slurmctld; without it `sacct` fails,
#              submitit cannot read job states, and a job that dies without a result is never noticed
#   slurm.conf one node (this host, NodeAddr=127.0.0.1, CPUs and memory from `slurmd -C`), one partition `debug`,
#              select/cons_tres with CR_CPU_Memory (cpus and memory are what a job asks for), proctrack/linuxproc,
#              task/none (no cgroups), JobRequeue=1 (jobs can be requeued, as on preemption)
#   daemons    started by hand (no systemd), as root, logs in /var/log/slurm
# Exit status: 0 ready; 3 cannot install here (not root, no apt, packages unavailable); 1 anything else.
set -euo pipefail

CLUSTER=transferlab
CONF_DIR=/etc/slurm
LOG_DIR=/var/log/slurm
PACKAGES=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server)

say() { echo "setup_slurm: $*" >&2; }
cannot() { say "$*"; exit 3; }

[ "$(id -u)" = 0 ] || cannot "needs root (installs packages and starts daemons)"

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    command -v apt-get >/dev/null || cannot "no apt-get to install ${missing[*]}"
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/tmp/setup_slurm_apt.log 2>&1 || {
        apt-get update -q >>/tmp/setup_slurm_apt.log 2>&1 &&
            apt-get install -y -q --no-install-recommends "${missing[@]}" >>/tmp/setup_slurm_apt.log 2>&1
    } || cannot "apt-get could not install ${missing[*]} (see /tmp/setup_slurm_apt.log)"
fi

mkdir -p "$CONF_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd /run/munge /run/mysqld

# --- munge: authentication between the SLURM commands and daemons
[ -s /etc/munge/munge.key ] || { mungekey --create --keyfile /etc/munge/munge.key 2>/dev/null || /usr/sbin/create-munge-key -f; }
chown munge:munge /etc/munge/munge.key /run/munge && chmod 400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "starting munged"
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
fi

# --- MariaDB for slurmdbd
chown mysql:mysql /run/mysqld
if ! mysqladmin ping >/dev/null 2>&1; then
    say "starting mariadb"
    [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql >/dev/null
    (setsid mariadbd --user=mysql >>"$LOG_DIR/mariadb.log" 2>&1 &)
    for _ in $(seq 60); do mysqladmin ping >/dev/null 2>&1 && break; sleep 0.5; done
fi
mysql -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
          CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
          GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"

# --- configuration (rewritten only when it changes, so a running cluster is left alone)
node=$(slurmd -C | head -1)  # NodeName=<host> CPUs=.. Boards=.. SocketsPerBoard=.. CoresPerSocket=.. ThreadsPerCore=.. RealMemory=..
write() {  # write $1 from stdin if its content differs; prints "changed" when it did
    local tmp; tmp=$(mktemp)
    cat >"$tmp"
    if ! cmp -s "$tmp" "$1"; then mv "$tmp" "$1"; echo changed; else rm -f "$tmp"; fi
}
changed=$(write "$CONF_DIR/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
LogFile=$LOG_DIR/slurmdbd.log
PidFile=/run/slurmdbd.pid
EOF
)
chmod 600 "$CONF_DIR/slurmdbd.conf"
changed+=$(write "$CONF_DIR/slurm.conf" <<EOF
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=1024
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=300
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
)

# --- daemons: slurmdbd, then the cluster in the accounting database, then slurmctld and slurmd
running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
if [ -n "$changed" ]; then  # new configuration: restart whatever runs with the old one
    for pid in /run/slurmd.pid /run/slurmctld.pid /run/slurmdbd.pid; do
        if running $pid; then kill "$(cat $pid)"; sleep 1; fi
    done
fi
if ! running /run/slurmdbd.pid; then
    say "starting slurmdbd"
    slurmdbd
fi
for _ in $(seq 60); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.5; done
sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
if ! running /run/slurmctld.pid; then
    say "starting slurmctld"
    slurmctld
fi
for _ in $(seq 60); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.5; done
if ! running /run/slurmd.pid; then
    say "starting slurmd"
    slurmd
fi
host=$(echo "$node" | sed -E 's/NodeName=([^ ]+).*/\1/')
for _ in $(seq 60); do
    state=$(sinfo -h -n "$host" -o %T 2>/dev/null || true)
    case "$state" in idle* | mixed* | allocated*) break ;; down* | drain*) scontrol update nodename="$host" state=resume 2>/dev/null || true ;; esac
    sleep 0.5
done
sacct -n -X -S now >/dev/null || { say "sacct does not answer (see $LOG_DIR/slurmdbd.log)"; exit 1; }
sinfo -h -n "$host" -o %T | grep -qE 'idle|mixed|allocated' || { say "node $host is not up: $(sinfo -h -N -o '%N %T %E')"; exit 1; }
say "ready: $(sinfo -h -o '%P %D %c CPUs %m MB %T')"
