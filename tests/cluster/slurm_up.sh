#!/usr/bin/env bash
# Bring up a one-node SLURM cluster with accounting and fake GPUs on this (Debian 12) machine.
# Idempotent: installs what is missing, rewrites the config only when it changed (restarting the slurm
# daemons then), starts what is not running, and waits until the node is idle and `sacct` answers.
# Run as root. See README.md in this directory; knobs are documented in lib.sh.
#
#   bash tests/cluster/slurm_up.sh        # ~30-60 s from nothing (apt included), ~3 s when installed, <1 s when up
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

T0=$SECONDS

install_pkgs() {
  local missing=() p
  for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
  done
  ((${#missing[@]} == 0)) && return 0
  command -v apt-get >/dev/null || die "packages missing (${missing[*]}) and no apt-get"
  export DEBIAN_FRONTEND=noninteractive
  log "apt-get install ${missing[*]}"
  # Try the package lists already on the machine first (saves the update); on failure refresh them.
  # Third-party sources that cannot be reached make `apt-get update` exit non-zero: only the install counts.
  if ! apt-get install -y -q --no-install-recommends "${missing[@]}" >"$STATE/apt.log" 2>&1; then
    log "apt-get update (the local package lists are missing or stale)"
    apt-get update -q >>"$STATE/apt.log" 2>&1 || log "apt-get update reported errors (ignored; see $STATE/apt.log)"
    apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$STATE/apt.log" 2>&1 \
      || { tail -n 30 "$STATE/apt.log" >&2; die "apt-get install ${missing[*]} failed (full log: $STATE/apt.log)"; }
  fi
  log "installed in $((SECONDS - T0)) s"
}

write_if_changed() {  # write_if_changed DEST MODE OWNER:GROUP < content; returns 0 when it changed
  local dest=$1 mode=$2 owner=$3 tmp
  tmp=$(mktemp)
  cat >"$tmp"
  if [ -f "$dest" ] && cmp -s "$tmp" "$dest"; then
    rm -f "$tmp"
    return 1
  fi
  install -m "$mode" -o "${owner%:*}" -g "${owner#*:}" "$tmp" "$dest"
  rm -f "$tmp"
  return 0
}

write_configs() {  # sets CHANGED=1 when a config file changed
  CHANGED=0
  mkdir -p "$ETC" "$STATE/dev" /var/spool/slurmctld /var/spool/slurmd "$LOGDIR"
  chown slurm:slurm /var/spool/slurmctld "$LOGDIR"
  # Fake GPUs: character devices with /dev/null's numbers. gres.conf needs a char/block device for File=
  # (a regular file works but logs an error; no File= at all drains the node); with task/none and no
  # cgroups nothing ever opens them. Jobs see CUDA_VISIBLE_DEVICES=<index>, torch sees no CUDA.
  local i
  for ((i = 0; i < GPUS; i++)); do
    [ -c "$STATE/dev/fakegpu$i" ] || { rm -f "$STATE/dev/fakegpu$i"; mknod -m 666 "$STATE/dev/fakegpu$i" c 1 3; }
  done
  # 90% of the real memory: slurmd drains a node that reports less than RealMemory.
  local mem
  mem=$(($(slurmd -C | head -1 | sed -E 's/.*RealMemory=([0-9]+).*/\1/') * 9 / 10))
  local gres_types="" gres_node=""
  if ((GPUS > 0)); then
    gres_types="GresTypes=gpu"
    gres_node=" Gres=gpu:$GPUS"
  fi
  write_if_changed "$ETC/slurm.conf" 644 root:root <<EOF && CHANGED=1 || true
$MARK
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
# No cgroups in CI: no CPU binding, no device confinement (the fake GPU files are never opened).
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# Take the node's CPUs from this file, not the hardware (the node is oversubscribed on purpose).
SlurmdParameters=config_overrides
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
# Keep finished jobs visible to squeue for 5 min (the plugin's squeue fallback needs >= 120 s).
MinJobAge=300
KillWait=5
# Without it a job with no --mem takes the whole node and jobs run one at a time.
DefMemPerCPU=500
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
# Accounting through slurmdbd: the executor plugin polls job states with sacct.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
# Reject jobs whose -A has no association, as production clusters do.
AccountingStorageEnforce=associations
# gres/gpu=N in sacct's AllocTRES (the test checks it for the train job).
AccountingStorageTRES=gres/gpu
# Snakemake's --comment rule_<name> in sacct's Comment field.
AccountingStoreFlags=job_comment
JobCompType=jobcomp/none
$gres_types
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$NCPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$NCPUS ThreadsPerCore=1 RealMemory=$mem$gres_node State=UNKNOWN
PartitionName=cpu Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$NODE Default=NO MaxTime=INFINITE State=UP
EOF
  write_if_changed "$ETC/gres.conf" 644 root:root <<EOF && CHANGED=1 || true
$MARK
AutoDetect=off
$( ((GPUS > 0)) && echo "NodeName=$NODE Name=gpu File=$STATE/dev/fakegpu[0-$((GPUS - 1))]")
EOF
  write_if_changed "$ETC/slurmdbd.conf" 600 slurm:slurm <<EOF && CHANGED=1 || true
$MARK
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=slurm
LogFile=$LOGDIR/slurmdbd.log
PidFile=/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StoragePort=3306
StorageUser=slurm
StoragePass=$DBPASS
StorageLoc=slurm_acct_db
EOF
}

start_munge() {
  if [ ! -s /etc/munge/munge.key ]; then
    log "creating the munge key"
    mungekey -c -f -k /etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
  fi
  install -d -o munge -g munge -m 0755 /run/munge
  if ! alive /run/munge/munged.pid; then
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged
    touch "$STATE/started-munged"
  fi
  wait_for "a munge round trip (munged)" 20 bash -c 'munge -n | unmunge'
}

start_mariadb() {
  install -d -o mysql -g root -m 0755 /run/mysqld
  [ -d /var/lib/mysql/mysql ] || { log "initialising the mariadb datadir"; mariadb-install-db --user=mysql >/dev/null; }
  if ! mariadb-admin ping >/dev/null 2>&1; then
    log "starting mariadbd"
    setsid -f /usr/sbin/mariadbd --user=mysql --bind-address=127.0.0.1 \
      --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900 \
      >"$STATE/mariadb.log" 2>&1 </dev/null
    touch "$STATE/started-mariadbd"
  fi
  wait_for "mariadb (mariadb-admin ping)" 60 mariadb-admin ping
  mariadb -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
              CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DBPASS';
              ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DBPASS';
              GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';" || die "cannot create the accounting database"
}

setup_accounting() {  # the cluster, the test account, and root's association with it (all idempotent)
  sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER" \
    || sacctmgr -i add cluster "$CLUSTER" >/dev/null || die "sacctmgr add cluster $CLUSTER failed"
  sacctmgr -n -P list account "$ACCOUNT" format=account | grep -qx "$ACCOUNT" \
    || sacctmgr -i add account "$ACCOUNT" Cluster="$CLUSTER" Description=powerclip-ci Organization=powerclip >/dev/null \
    || die "sacctmgr add account $ACCOUNT failed"
  sacctmgr -n -P list assoc where user=root account="$ACCOUNT" cluster="$CLUSTER" format=account | grep -qx "$ACCOUNT" \
    || sacctmgr -i add user root Account="$ACCOUNT" Cluster="$CLUSTER" >/dev/null \
    || die "sacctmgr add user root account=$ACCOUNT failed"
}

[ "$(id -u)" = 0 ] || { echo "[powerclip-slurm] ERROR: must run as root" >&2; exit 1; }
if [ -f "$ETC/slurm.conf" ] && ! head -1 "$ETC/slurm.conf" | grep -qxF "$MARK"; then
  echo "[powerclip-slurm] ERROR: $ETC/slurm.conf exists and was not written by this script: refusing to replace it" >&2
  exit 1
fi
mkdir -p "$STATE"
install_pkgs
write_configs
if ((CHANGED)); then
  # A config change needs the slurm daemons restarted (a no-op when they are not running).
  stop_pidfile slurmd /run/slurmd.pid
  stop_pidfile slurmctld /run/slurmctld.pid
  stop_pidfile slurmdbd /run/slurmdbd.pid
fi
start_munge
start_mariadb
if ! alive /run/slurmdbd.pid; then
  log "starting slurmdbd"
  /usr/sbin/slurmdbd || die "slurmdbd did not start"
fi
wait_for "slurmdbd (sacctmgr list cluster)" 60 sacctmgr -n -P list cluster
setup_accounting
if ! alive /run/slurmctld.pid; then
  log "starting slurmctld"
  /usr/sbin/slurmctld || die "slurmctld did not start"
fi
wait_for "slurmctld (scontrol ping)" 60 bash -c 'scontrol ping | grep -q UP'
if ! alive /run/slurmd.pid; then
  log "starting slurmd"
  /usr/sbin/slurmd || die "slurmd did not start"
fi
for _ in $(seq 1 240); do
  node_ready && break
  # A node left DRAIN/DOWN by an earlier configuration is resumed.
  if sinfo -h -n "$NODE" -o '%T' 2>/dev/null | grep -qE 'drain|down|inval|fail'; then
    scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
  fi
  sleep 0.25
done
node_ready || die "node $NODE is not idle after 60 s"
wait_for "sacct" 30 sacct -n -X
sacctmgr -n -P list assoc where user=root account="$ACCOUNT" format=account | grep -qx "$ACCOUNT" \
  || die "root has no association with account $ACCOUNT"
log "up in $((SECONDS - T0)) s: cluster $CLUSTER, account $ACCOUNT, partitions $(sinfo -h -o '%P' | tr '\n' ' ')node $(sinfo -h -N -p gpu -o '%N %T cpus=%c mem=%m gres=%G')"
