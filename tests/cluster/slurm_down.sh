#!/usr/bin/env bash
# Stop the cluster slurm_up.sh started (idempotent, safe when nothing runs).
# Cancels queued/running jobs, stops slurmd, slurmctld and slurmdbd, and stops mariadbd and munged only
# when slurm_up.sh started them (a marker in the state dir). Packages, config and the accounting
# database stay, so the next slurm_up.sh takes seconds.
#
#   bash tests/cluster/slurm_down.sh           # stop
#   bash tests/cluster/slurm_down.sh --purge   # stop and wipe the SLURM state, logs and accounting database
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[ "$(id -u)" = 0 ] || { echo "[powerclip-slurm] ERROR: must run as root" >&2; exit 1; }
PURGE=0
[ "${1:-}" = --purge ] && PURGE=1

if alive /run/slurmctld.pid; then
  ids=$(squeue -h -o %i 2>/dev/null || true)
  if [ -n "$ids" ]; then
    log "cancelling jobs: $(echo $ids)"
    # shellcheck disable=SC2086
    scancel $ids || true
    sleep 1
  fi
fi
stop_pidfile slurmd /run/slurmd.pid
stop_pidfile slurmctld /run/slurmctld.pid
stop_pidfile slurmdbd /run/slurmdbd.pid

if ((PURGE)) && mariadb-admin ping >/dev/null 2>&1; then
  # Through SQL: deleting /var/lib/mysql/slurm_acct_db by hand corrupts InnoDB's dictionary.
  log "dropping the accounting database"
  mariadb -e "DROP DATABASE IF EXISTS slurm_acct_db;" || true
fi
if [ -e "$STATE/started-mariadbd" ]; then
  stop_pidfile mariadbd /run/mysqld/mysqld.pid
  rm -f "$STATE/started-mariadbd"
fi
if [ -e "$STATE/started-munged" ]; then
  stop_pidfile munged /run/munge/munged.pid
  rm -f "$STATE/started-munged"
fi
if ((PURGE)); then
  rm -rf /var/spool/slurmctld/* /var/spool/slurmd/* "$LOGDIR"/* "$STATE"
  log "purged (packages and $ETC/*.conf kept)"
fi
log "down"
