#!/usr/bin/env bash
# The CI cluster: a single-node Slurm "ibq" (partition "debug", CPUs only) with slurmdbd accounting,
# on a root Debian 12 box without systemd, so that the test suite submits, preempts and requeues real
# Slurm jobs. It is not a template for a GPU cluster: there, submit with cluster=slurm_gpu (README,
# "Running on a cluster") to the cluster you have.
#
#   bash scripts/slurm.sh up      # install if needed, configure, start, wait until healthy
#   bash scripts/slurm.sh down    # stop all daemons (idempotent)
#   bash scripts/slurm.sh status  # sinfo + accounting check; exit 0 healthy, 1 otherwise
#
# Pitfalls it handles: no systemd (daemons started by hand, PID files checked), munge before the
# daemons, MariaDB before slurmdbd, slurmctld that reports a dead slurmd as idle for SlurmdTimeout.
set -euo pipefail

CLUSTER=ibq
PARTITION=debug
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)

ETC=/etc/slurm
SLURM_CONF=$ETC/slurm.conf
DBD_CONF=$ETC/slurmdbd.conf
LOG=/var/log/slurm
MUNGE_LOG=/var/log/munge/munged.log
MARIADB_LOG=$LOG/mariadbd.log
DB_NAME=slurm_acct_db
DB_USER=slurm
WAIT_S=${SLURM_WAIT_S:-30}   # bound for each readiness poll

# PID files: slurm ones are set in the configs below; munged and mariadbd use
# their Debian defaults (/run/munge, and pid-file in /etc/mysql/mariadb.conf.d).
PID_MUNGED=/run/munge/munged.pid
PID_MARIADB=/run/mysqld/mysqld.pid
PID_SLURMDBD=/run/slurmdbd.pid
PID_SLURMCTLD=/run/slurmctld.pid
PID_SLURMD=/run/slurmd.pid

say() { echo "slurm.sh: $*"; }
die() { echo "slurm.sh: FAILED: $*" >&2; exit 1; }

# True if the PID file names a live process.
alive() { local f=$1 pid; [[ -s $f ]] && pid=$(<"$f") && [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null; }

# wait_for <seconds> <what> <log> <command...>: poll every 0.5 s, die naming the log on timeout.
wait_for() {
  local secs=$1 what=$2 log=$3; shift 3
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "$what not ready after ${secs}s (read $log)"
    sleep 0.5
  done
}

# --- health probes (each bounded by `timeout`: a hung daemon must not hang us) ---
munge_ok()    { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
mariadb_ok()  { timeout 5 mariadb-admin --silent ping >/dev/null 2>&1; }
dbd_ok()      { timeout 10 sacctmgr -n -P list cluster format=cluster >/dev/null 2>&1; }
ctld_ok()     { timeout 10 scontrol ping 2>/dev/null | grep -q 'is UP'; }
node_state()  { timeout 10 sinfo -h -p "$PARTITION" -o %T 2>/dev/null | head -n1; }
# A usable node: idle, or busy with other people's jobs. A trailing '*' means "not responding".
node_usable() { [[ $(node_state) =~ ^(idle|mixed|allocated|completing)$ ]]; }
# sacct prints errors but can still exit 0 when slurmdbd is down, so also require empty stderr.
sacct_ok()    { local err; err=$(timeout 10 sacct -n -X -o JobID -S now-1hours 2>&1 >/dev/null) && [[ -z $err ]]; }

# slurmctld only notices a dead slurmd after SlurmdTimeout (300 s) and keeps
# reporting the node idle meanwhile, so also check the local PID files.
dead_daemons() {
  local d; for d in munged:$PID_MUNGED mariadbd:$PID_MARIADB slurmdbd:$PID_SLURMDBD \
                    slurmctld:$PID_SLURMCTLD slurmd:$PID_SLURMD; do
    alive "${d#*:}" || echo -n "${d%%:*} "
  done
}

healthy() { [[ -z $(dead_daemons) ]] && munge_ok && mariadb_ok && dbd_ok && ctld_ok && node_usable && sacct_ok; }

final_line() {
  echo "slurm up: partition $PARTITION, node $(hostname -s) $(node_state), accounting on"
}

# --- install ---------------------------------------------------------------------
install_packages() {
  local missing=() p
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  ((${#missing[@]} == 0)) && return 0
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # The image's /usr/sbin/policy-rc.d (exit 101) keeps postinst from starting any
  # daemon, so nothing is running after this; we start everything ourselves.
  apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
}

# --- config ------------------------------------------------------------------------
# install_if_changed <tmpfile> <dest> <mode>: echo "changed" when dest was (re)written.
install_if_changed() {
  local tmp=$1 dest=$2 mode=$3
  if [[ -f $dest ]] && cmp -s "$tmp" "$dest"; then
    rm -f "$tmp"; chmod "$mode" "$dest"
  else
    install -m "$mode" -o root -g root "$tmp" "$dest"; rm -f "$tmp"; echo changed
  fi
}

write_slurm_conf() {
  local host ncpu mem tmp
  host=$(hostname -s)
  ncpu=$(nproc)
  # RealMemory must be <= what slurmd -C reports, or the node is drained ("Low
  # RealMemory"); left at the 1 MB default, every --mem request (submitit mem_gb)
  # fails. Round down to whole GiB so the file is stable across runs.
  mem=$(slurmd -C 2>/dev/null | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -n1)
  [[ $mem =~ ^[0-9]+$ ]] || die "could not read RealMemory from 'slurmd -C'"
  mem=$(( mem / 1024 * 1024 )); ((mem > 0)) || mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
  tmp=$(mktemp)
  cat >"$tmp" <<EOF
# Written by scripts/slurm.sh -- edits are overwritten on the next 'up'.
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
# No cgroups without systemd: linuxproc + task/none need no cgroup.conf.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
# CR_Core (not CR_Core_Memory): a job without --mem must not take the whole node's memory.
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Test-sized waits: a requeued job may start again cred_expire seconds after its requeue (default 120),
# and pending jobs are looked at every sched_interval (60) and bf_interval (30) seconds; a preempted job
# would otherwise idle for minutes before it resumes.
AuthInfo=cred_expire=10
SchedulerParameters=sched_interval=2,bf_interval=2
ReturnToService=2
MailProg=/bin/true
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$PID_SLURMCTLD
SlurmdPidFile=$PID_SLURMD
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
MinJobAge=600
# Accounting through slurmdbd, so sacct works (and submitit sees FAILED jobs
# instead of waiting forever on a job that died hard).
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG/jobcomp.txt
# NodeName must be this host's short name, or slurmd can't find itself.
NodeName=$host NodeAddr=127.0.0.1 CPUs=$ncpu RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  install_if_changed "$tmp" "$SLURM_CONF" 644
}

write_dbd_conf() {
  local pass tmp
  # Keep the existing DB password so the file (and the DB user) stay stable.
  pass=$(sed -n 's/^StoragePass=//p' "$DBD_CONF" 2>/dev/null || true)
  [[ -n $pass ]] || pass=$(head -c 18 /dev/urandom | base64 | tr -d '/+=')
  DB_PASS=$pass
  tmp=$(mktemp)
  cat >"$tmp" <<EOF
# Written by scripts/slurm.sh -- edits are overwritten on the next 'up'.
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
LogFile=$LOG/slurmdbd.log
PidFile=$PID_SLURMDBD
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=$DB_USER
StoragePass=$pass
StorageLoc=$DB_NAME
EOF
  # slurmdbd refuses to start unless its config is mode 600 (it holds the DB password).
  install_if_changed "$tmp" "$DBD_CONF" 600
}

# --- daemons -----------------------------------------------------------------------
start_munged() {
  alive "$PID_MUNGED" && munge_ok && return 0
  # Without systemd nothing creates /run/munge; munged also insists on its
  # key being owned by munge and not readable by others.
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  [[ -s /etc/munge/munge.key ]] || runuser -u munge -- mungekey --create
  chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
  rm -f "$PID_MUNGED"
  runuser -u munge -- /usr/sbin/munged || die "munged did not start (read $MUNGE_LOG)"
  wait_for "$WAIT_S" munged "$MUNGE_LOG" munge_ok
}

start_mariadb() {
  mariadb_ok && return 0
  # No systemd: /run/mysqld (socket + pid) must be created by hand, owned by mysql.
  mkdir -p /run/mysqld; chown mysql:mysql /run/mysqld
  touch "$MARIADB_LOG"; chown mysql:mysql "$MARIADB_LOG"
  # mariadbd does not daemonize: detach it (setsid) so it outlives this shell
  # and a process-group kill aimed at our caller.
  # innodb_lock_wait_timeout=900 is what slurmdbd asks for (it warns otherwise); the
  # buffer-pool size it also suggests is left at the default to keep memory use low.
  setsid /usr/sbin/mariadbd --user=mysql --log-error="$MARIADB_LOG" --innodb-lock-wait-timeout=900 \
    </dev/null >>"$MARIADB_LOG" 2>&1 &
  wait_for "$WAIT_S" mariadb "$MARIADB_LOG" mariadb_ok
}

setup_database() {
  # Root logs in through the unix socket (unix_socket auth), no password needed.
  mariadb --batch <<EOF || die "could not create database $DB_NAME (read $MARIADB_LOG)"
CREATE DATABASE IF NOT EXISTS $DB_NAME;
CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
ALTER USER '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'localhost';
EOF
}

# start_slurm_daemon <binary> <pidfile> <restart?>
start_slurm_daemon() {
  local bin=$1 pidf=$2 restart=$3 name; name=$(basename "$bin")
  if alive "$pidf"; then
    [[ -n $restart ]] || return 0
    say "config changed, restarting $name"
    stop_pidfile "$name" "$pidf"
  fi
  rm -f "$pidf"
  # The slurm daemons fork into the background themselves.
  "$bin" || die "$name did not start (read $LOG/$name.log)"
}

# stop_pidfile <name> <pidfile>: SIGTERM, wait up to 15 s, then SIGKILL.
stop_pidfile() {
  local name=$1 pidf=$2 pid i
  alive "$pidf" || { rm -f "$pidf"; return 0; }
  pid=$(<"$pidf")
  kill "$pid" 2>/dev/null || true
  for ((i = 0; i < 150; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then say "$name ($pid) ignored SIGTERM, killing"; kill -9 "$pid" 2>/dev/null || true; fi
  rm -f "$pidf"
}

# stop <exact process name> <user> <pidfile>: by PID file; then any leftover
# (e.g. started with another PID file) by exact name and owner.
stop() {
  local name=$1 user=$2 pidf=$3 pids
  stop_pidfile "$name" "$pidf"
  if pids=$(pgrep -x -u "$user" "$name"); then
    say "stopping leftover $name: $pids"
    # shellcheck disable=SC2086
    kill $pids 2>/dev/null || true
    sleep 1
    # shellcheck disable=SC2086
    if pids=$(pgrep -x -u "$user" "$name"); then kill -9 $pids 2>/dev/null || true; fi
  fi
  return 0
}

# --- subcommands --------------------------------------------------------------------
cmd_up() {
  local t0=$SECONDS conf_changed dbd_changed
  install_packages
  mkdir -p "$ETC" /var/spool/slurmctld /var/spool/slurmd "$LOG"
  conf_changed=$(write_slurm_conf)
  dbd_changed=$(write_dbd_conf)
  DB_PASS=$(sed -n 's/^StoragePass=//p' "$DBD_CONF")   # write_dbd_conf ran in a subshell

  if [[ -z $conf_changed && -z $dbd_changed ]] && healthy; then
    say "already running and healthy"
    final_line
    return 0
  fi

  # Order matters: slurmdbd, sacctmgr and slurmctld all authenticate through
  # munge, so munged comes first; slurmdbd needs mariadb; slurmctld needs the
  # cluster registered in slurmdbd; slurmd needs slurmctld.
  start_munged
  start_mariadb
  setup_database
  start_slurm_daemon /usr/sbin/slurmdbd "$PID_SLURMDBD" "$dbd_changed"
  # sacctmgr reads slurm.conf, which must already say accounting_storage/slurmdbd
  # (written above); slurmdbd creates its tables on first start, so give it time.
  wait_for "$WAIT_S" slurmdbd "$LOG/slurmdbd.log" dbd_ok
  if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null || die "sacctmgr add cluster $CLUSTER failed (read $LOG/slurmdbd.log)"
  fi
  start_slurm_daemon /usr/sbin/slurmctld "$PID_SLURMCTLD" "$conf_changed"
  wait_for "$WAIT_S" slurmctld "$LOG/slurmctld.log" ctld_ok
  start_slurm_daemon /usr/sbin/slurmd "$PID_SLURMD" "$conf_changed"
  # After a restart the node may still be busy with jobs that survived; only a
  # fresh start must reach idle.
  wait_for "$WAIT_S" "slurmd (node $(hostname -s) idle)" "$LOG/slurmd.log" node_usable
  wait_for "$WAIT_S" "sacct (accounting)" "$LOG/slurmdbd.log" sacct_ok
  say "started in $((SECONDS - t0))s"
  final_line
}

cmd_down() {
  # Reverse start order: clients of slurmdbd/munge go first (slurmctld flushes
  # its last accounting records to slurmdbd on exit). Each daemon takes about 2 s
  # to exit, so the independent ones in each stage are stopped in parallel.
  stop slurmd    root  "$PID_SLURMD" &
  stop slurmctld root  "$PID_SLURMCTLD" &
  wait
  stop slurmdbd  root  "$PID_SLURMDBD"
  stop mariadbd  mysql "$PID_MARIADB" &
  stop munged    munge "$PID_MUNGED" &
  wait
  say "down"
}

cmd_status() {
  if ! command -v sinfo >/dev/null; then echo "slurm: not installed"; return 1; fi
  local rc=0 dead
  dead=$(dead_daemons)
  [[ -z $dead ]] || { echo "not running: ${dead% }"; rc=1; }
  if ctld_ok; then timeout 10 sinfo || true; else echo "slurmctld: not responding"; rc=1; fi
  node_usable || { echo "node: not usable (state '$(node_state)')"; rc=1; }
  if sacct_ok; then echo "accounting: on (sacct works)"; else echo "accounting: NOT working"; rc=1; fi
  return $rc
}

case ${1:-} in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
