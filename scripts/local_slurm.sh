#!/usr/bin/env bash
# scripts/local_slurm.sh - a real SLURM cluster on loopback, for CI and for trying the SLURM launcher on
# one machine (Debian 12 packages; no systemd needed). Run as root. One node by default (named after this
# host); MICROGPT_SLURM_NODES=2 starts two nodes n1 and n2 (one slurmd -N per node, each with its own port,
# spool dir, log and PID file), so multi-node jobs (sbatch -N2, trainer.num_nodes=2) really are scheduled
# across two SLURM nodes. Their names resolve through an /etc/hosts line that `up` adds and `down` removes.
#
#   bash scripts/local_slurm.sh up       install (apt, once) + start; waits until every node is idle
#   bash scripts/local_slurm.sh down     cancel all jobs, stop the daemons this script started (by PID)
#   eval "$(bash scripts/local_slurm.sh env)"   export SLURM_CONF for sbatch/squeue/sacct/submitit
#   other commands: install | start | stop (= down) | status | wait | smoke | clean (down + delete state)
#
# Daemons: munged, MariaDB + slurmdbd (accounting, so `sacct` works and submitit sees jobs that were
# cancelled or killed), slurmctld, one slurmd per node. Everything lives under $MICROGPT_SLURM_DIR; every
# wait has a timeout. `up` is idempotent: daemons that are already running (their PID file is alive) are
# reused; to change the node count of a running cluster, `down` first.
#
# Every node is the whole machine: each declares all its CPUs (so a 1-node job with 2 tasks still fits) and
# an equal share of its memory. With 2 nodes, SLURM may therefore run twice as many 1-CPU jobs as there
# are cores: fine for tests of correctness, not for timing.
#
# Knobs (environment):
#   MICROGPT_SLURM_DIR=/tmp/microgpt-slurm   config, state, logs, PID files
#   MICROGPT_SLURM_NODES=1                   number of nodes; >1: nodes ${PREFIX}1..N, slurmd ports from 6818 up
#   MICROGPT_SLURM_NODE_PREFIX=n             node names for NODES>1 (n1, n2, ...)
#   MICROGPT_SLURM_PARTITION=debug           the (default) partition's name
#   MICROGPT_SLURM_ACCOUNTING=1              0: no slurmdbd/MariaDB (faster start; sacct will not work)
#   MICROGPT_SLURM_TIMEOUT=60                seconds to wait for each daemon / for the node to be idle
#   MICROGPT_SLURM_PORTS="6817 6818 6819 3306"   slurmctld, slurmd (the first), slurmdbd, MariaDB ports
set -euo pipefail

DIR=${MICROGPT_SLURM_DIR:-/tmp/microgpt-slurm}
PARTITION=${MICROGPT_SLURM_PARTITION:-debug}
ACCOUNTING=${MICROGPT_SLURM_ACCOUNTING:-1}
TIMEOUT=${MICROGPT_SLURM_TIMEOUT:-60}
NODES=${MICROGPT_SLURM_NODES:-1}
PREFIX=${MICROGPT_SLURM_NODE_PREFIX:-n}
read -r CTLD_PORT SLURMD_PORT DBD_PORT DB_PORT <<<"${MICROGPT_SLURM_PORTS:-6817 6818 6819 3306}"
DB_PASS=microgpt-ci

ETC=$DIR/etc
RUN=$DIR/run
LOG=$DIR/log
export SLURM_CONF=$ETC/slurm.conf
HOST=$(hostname -s)
HOSTS_TAG="# microgpt local_slurm $DIR" # marks the /etc/hosts line this script added (and `down` removes)
DB_RUN=$RUN/mysqld # MariaDB runs as mysql: its socket and PID file get their own folder
DB_SOCK=$DB_RUN/mysqld.sock

say() { printf '[local_slurm %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
fail() {
  say "ERROR: $*"
  exit 1
}
[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || fail "MICROGPT_SLURM_NODES must be a whole number >= 1, got '$NODES'"
[[ "$PREFIX" =~ ^[a-z][a-z0-9-]*$ ]] || fail "MICROGPT_SLURM_NODE_PREFIX must be a lowercase name, got '$PREFIX'"
# the node names: this host's own name for one node (as before), ${PREFIX}1..N for several
if [ "$NODES" = 1 ]; then
  NODE_NAMES=("$HOST")
else
  NODE_NAMES=()
  for ((i = 1; i <= NODES; i++)); do NODE_NAMES+=("$PREFIX$i"); done
fi

need_root() { [ "$(id -u)" = 0 ] || fail "run as root (it installs packages and starts system daemons)"; }
# a PID file whose process is alive
running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# retry "$@" every 0.2 s until it succeeds or $TIMEOUT seconds have passed
wait_for() {
  local what=$1 deadline=$((SECONDS + TIMEOUT))
  shift
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || {
      say "timed out after ${TIMEOUT}s waiting for $what"
      return 1
    }
    sleep 0.2
  done
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
munge_ok() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

# TERM, up to 15 s, then KILL; only the process named in our own PID file
stop_pid() {
  local name=$1 file=$2 pid i
  [ -s "$file" ] || return 0
  pid=$(cat "$file")
  if kill -0 "$pid" 2>/dev/null; then
    say "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 75); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then
      say "$name (pid $pid) ignored TERM for 15s: KILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$file"
}

cmd_install() {
  need_root
  local pkgs="munge slurmctld slurmd slurm-client" missing="" p
  [ "$ACCOUNTING" = 1 ] && pkgs="$pkgs slurmdbd mariadb-server"
  for p in $pkgs; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
  done
  if [ -z "$missing" ]; then
    say "packages already installed"
    return
  fi
  say "apt-get install$missing"
  export DEBIAN_FRONTEND=noninteractive
  timeout 300 apt-get update -qq || fail "apt-get update failed"
  # the packages' postinst scripts try to start services; without an init system that is refused (harmless)
  # shellcheck disable=SC2086
  timeout 600 apt-get install -y -qq --no-install-recommends $missing >"$DIR.apt.log" 2>&1 \
    || {
      tail -20 "$DIR.apt.log"
      fail "apt-get install failed"
    }
}

write_config() {
  mkdir -p "$ETC" "$RUN" "$LOG" "$DIR/state/ctld" "$DIR/jobs"
  local n
  for n in "${NODE_NAMES[@]}"; do mkdir -p "$DIR/state/slurmd-$n"; done
  chown slurm:slurm "$RUN" "$LOG" "$DIR/state/ctld"
  chmod 0755 "$DIR" "$ETC" "$RUN" "$LOG" "$DIR/jobs"
  chmod 1777 "$DIR/jobs"

  # the node's CPUs and memory as slurmd sees them; memory at 85% so the node is never refused for having
  # less than configured. CPUs only (no socket/core/thread layout) + CR_CPU_Memory: every hardware thread
  # is a schedulable CPU, so two 1-CPU jobs run side by side on a 2-thread machine. Several nodes: each
  # has all the CPUs (slurmd -N reports the host's) and 1/NODES of the memory.
  local hw cpus mem
  hw=$(/usr/sbin/slurmd -C | head -1)
  cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$hw")
  mem=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
  [ -n "$cpus" ] && [ -n "$mem" ] || fail "cannot read the node's hardware from 'slurmd -C': $hw"
  mem=$((mem * 85 / 100 / NODES))

  # one NodeName line per node: all on 127.0.0.1; several nodes each get their own slurmd port (skipping
  # the other daemons' ports)
  local nodelines="" port=$SLURMD_PORT
  if [ "$NODES" = 1 ]; then
    nodelines="NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN"
  else
    for n in "${NODE_NAMES[@]}"; do
      while [ "$port" = "$CTLD_PORT" ] || [ "$port" = "$DBD_PORT" ] || [ "$port" = "$DB_PORT" ]; do port=$((port + 1)); done
      nodelines+="NodeName=$n NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$port CPUs=$cpus RealMemory=$mem State=UNKNOWN"$'\n'
      port=$((port + 1))
    done
  fi

  local accounting="AccountingStorageType=accounting_storage/none" gather=jobacct_gather/none
  if [ "$ACCOUNTING" = 1 ]; then
    accounting="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT"
    gather=jobacct_gather/linux
  fi

  cat >"$SLURM_CONF" <<EOF
# written by scripts/local_slurm.sh: $NODES node(s) on loopback: ${NODE_NAMES[*]}
ClusterName=microgpt
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MailProg=/bin/true
StateSaveLocation=$DIR/state/ctld
SlurmdSpoolDir=$DIR/state/slurmd-%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=$gather
$accounting
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=1000
JobRequeue=1
ReturnToService=2
InactiveLimit=0
KillWait=5
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=60
Waittime=0
$nodelines
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

  if [ "$ACCOUNTING" = 1 ]; then
    # slurmdbd reads slurmdbd.conf next to $SLURM_CONF; it must be 0600 and owned by SlurmUser
    cat >"$ETC/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=slurm
DebugLevel=info
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=microgpt_slurm_acct
EOF
    chown slurm:slurm "$ETC/slurmdbd.conf"
    chmod 0600 "$ETC/slurmdbd.conf"
  fi
}

start_munge() {
  if [ ! -s /etc/munge/munge.key ]; then
    say "creating /etc/munge/munge.key"
    mkdir -p /etc/munge
    mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
      || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
  fi
  # no systemd-tmpfiles: make the socket directory by hand
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown munge:munge /run/munge /var/lib/munge /var/log/munge
  chmod 0755 /run/munge
  if munge_ok; then
    say "munged already running, reusing it"
    return
  fi
  runuser -u munge -- /usr/sbin/munged --force
  wait_for munged munge_ok || fail "munged does not answer (see /var/log/munge/munged.log)"
  cp /run/munge/munged.pid "$RUN/munged.pid" # ours: `down` stops it
  say "munged up (pid $(cat "$RUN/munged.pid"))"
}

db_ping() { mariadb-admin --socket="$DB_SOCK" ping; }

start_mariadb() {
  mkdir -p "$DIR/mysql" "$LOG/mysql" "$DB_RUN"
  chown mysql:mysql "$DIR/mysql" "$LOG/mysql" "$DB_RUN"
  if [ ! -d "$DIR/mysql/mysql" ]; then
    say "initialising MariaDB in $DIR/mysql"
    timeout 120 mariadb-install-db --user=mysql --datadir="$DIR/mysql" --skip-test-db \
      --auth-root-authentication-method=socket >"$LOG/mariadb-install.log" 2>&1 \
      || {
        tail -20 "$LOG/mariadb-install.log"
        fail "mariadb-install-db failed"
      }
  fi
  if ! running "$DB_RUN/mysqld.pid"; then
    port_open "$DB_PORT" && fail "port $DB_PORT is taken by another database; set MICROGPT_SLURM_PORTS"
    setsid -f /usr/sbin/mariadbd --user=mysql --datadir="$DIR/mysql" --socket="$DB_SOCK" \
      --pid-file="$DB_RUN/mysqld.pid" --bind-address=127.0.0.1 --port="$DB_PORT" --skip-name-resolve \
      --log-error="$LOG/mysql/mariadb.err" --innodb-buffer-pool-size=128M </dev/null >/dev/null 2>&1
  fi
  wait_for MariaDB db_ping || {
    tail -20 "$LOG/mysql/mariadb.err" >&2 || true
    fail "MariaDB did not start"
  }
  wait_for "MariaDB pid file" test -s "$DB_RUN/mysqld.pid" || fail "MariaDB wrote no pid file"
  timeout 30 mariadb --socket="$DB_SOCK" -e "
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
    GRANT ALL ON microgpt_slurm_acct.* TO 'slurm'@'127.0.0.1';
    GRANT ALL ON microgpt_slurm_acct.* TO 'slurm'@'localhost';
    FLUSH PRIVILEGES;" || fail "cannot create the slurm database user"
  say "MariaDB up (pid $(cat "$DB_RUN/mysqld.pid"))"
}

start_slurmdbd() {
  if ! running "$RUN/slurmdbd.pid"; then
    port_open "$DBD_PORT" && fail "port $DBD_PORT is taken (another slurmdbd?); stop it or set MICROGPT_SLURM_PORTS"
    /usr/sbin/slurmdbd
  fi
  wait_for slurmdbd port_open "$DBD_PORT" || {
    tail -20 "$LOG/slurmdbd.log" >&2 || true
    fail "slurmdbd did not start"
  }
  say "slurmdbd up (pid $(cat "$RUN/slurmdbd.pid"))"
}

node_ready() {
  local n=$1 st
  st=$(timeout 10 sinfo -h -N -n "$n" -o '%t' 2>/dev/null || true)
  case "$st" in
    idle* | mix* | alloc*) return 0 ;;
    down* | drain* | fail* | inval*)
      # e.g. left DOWN in the saved state by an unclean stop
      timeout 10 scontrol update nodename="$n" state=resume >/dev/null 2>&1 || true
      ;;
  esac
  return 1
}

cmd_wait() {
  local n
  for n in "${NODE_NAMES[@]}"; do
    wait_for "node $n to be idle" node_ready "$n" || {
      timeout 10 scontrol show node "$n" >&2 || true
      tail -20 "$LOG/slurmctld.log" "$LOG/slurmd-$n.log" >&2 || true
      return 1
    }
    say "node $n: $(timeout 10 sinfo -h -N -n "$n" -o '%t %c CPUs %m MB')"
  done
}

# ---- name resolution for the node names (several nodes) ------------------------------------------------
# Jobs find each other by node name: Lightning's SLURMEnvironment sets MASTER_ADDR to the first node of
# SLURM_NODELIST (n1), which must resolve on every node. One tagged line in /etc/hosts; `down` removes it.
# /etc/hosts is rewritten in place (it is often a bind mount that cannot be replaced by a rename).

hosts_without_ours() { grep -vF "$HOSTS_TAG" /etc/hosts || true; }

add_hosts() {
  [ "$NODES" = 1 ] && return 0
  local n addr others
  others=$(hosts_without_ours)
  for n in "${NODE_NAMES[@]}"; do
    # a name that already means something else here (a real host, another cluster's line) is not ours to take
    addr=$(awk -v n="$n" '$1 !~ /^#/ { for (i = 2; i <= NF; i++) if ($i == n) { print $1; exit } }' <<<"$others")
    [ -z "$addr" ] || [ "$addr" = 127.0.0.1 ] \
      || fail "node name $n already resolves to $addr in /etc/hosts; pick other names with MICROGPT_SLURM_NODE_PREFIX"
  done
  printf '%s\n127.0.0.1 %s %s\n' "$others" "${NODE_NAMES[*]}" "$HOSTS_TAG" >/etc/hosts
  for n in "${NODE_NAMES[@]}"; do
    getent hosts "$n" >/dev/null || fail "node name $n does not resolve after adding it to /etc/hosts"
  done
  say "/etc/hosts: 127.0.0.1 ${NODE_NAMES[*]}"
}

remove_hosts() {
  grep -qF "$HOSTS_TAG" /etc/hosts 2>/dev/null || return 0
  local others
  others=$(hosts_without_ours)
  printf '%s\n' "$others" >/etc/hosts
  say "/etc/hosts: removed the node names this script added"
}

# the node names of the cluster that is up ($RUN/nodes, written by start), for wait/smoke/status
use_running_nodes() {
  if [ -s "$RUN/nodes" ]; then
    read -r -a NODE_NAMES <"$RUN/nodes"
    NODES=${#NODE_NAMES[@]}
  fi
}

cmd_start() {
  need_root
  command -v slurmctld >/dev/null || fail "SLURM is not installed: run '$0 install' (or '$0 up')"
  local t0=$SECONDS n pidf
  if [ -s "$RUN/nodes" ] && [ "$(cat "$RUN/nodes")" != "${NODE_NAMES[*]}" ] && running "$RUN/slurmctld.pid"; then
    fail "the cluster is up with nodes '$(cat "$RUN/nodes")', not '${NODE_NAMES[*]}'; run '$0 down' first"
  fi
  write_config
  add_hosts
  echo "${NODE_NAMES[*]}" >"$RUN/nodes"
  start_munge
  if [ "$ACCOUNTING" = 1 ]; then
    start_mariadb
    start_slurmdbd
  fi
  if ! running "$RUN/slurmctld.pid"; then
    port_open "$CTLD_PORT" && fail "port $CTLD_PORT is taken (another slurmctld?); stop it or set MICROGPT_SLURM_PORTS"
    /usr/sbin/slurmctld
  fi
  wait_for slurmctld timeout 5 scontrol ping || {
    tail -30 "$LOG/slurmctld.log" >&2 || true
    fail "slurmctld did not start"
  }
  say "slurmctld up (pid $(cat "$RUN/slurmctld.pid"))"
  for n in "${NODE_NAMES[@]}"; do
    pidf=$RUN/slurmd-$n.pid
    # one node: slurmd finds itself by this host's name; several: -N names the node this daemon serves
    if ! running "$pidf"; then
      if [ "$NODES" = 1 ]; then /usr/sbin/slurmd; else /usr/sbin/slurmd -N "$n"; fi
    fi
    wait_for "slurmd $n" running "$pidf" || {
      tail -30 "$LOG/slurmd-$n.log" >&2 || true
      fail "slurmd for node $n did not start"
    }
    say "slurmd $n up (pid $(cat "$pidf"))"
  done
  cmd_wait
  say "cluster up in $((SECONDS - t0))s with $NODES node(s); clients need: export SLURM_CONF=$SLURM_CONF"
}

cmd_stop() {
  if running "$RUN/slurmctld.pid"; then
    # jobs first, so that no job step outlives slurmd
    local jobs
    jobs=$(timeout 10 squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ' || true)
    if [ -n "${jobs// /}" ]; then
      say "cancelling jobs: $jobs"
      # shellcheck disable=SC2086
      timeout 10 scancel $jobs 2>/dev/null || true
      wait_for "jobs to end" test -z "$(timeout 5 squeue -h -o %A 2>/dev/null)" || true
    fi
  fi
  local f
  # every node's slurmd this script started, whatever MICROGPT_SLURM_NODES says now (slurmd.pid: older layout)
  for f in "$RUN"/slurmd-*.pid "$RUN/slurmd.pid"; do
    [ -e "$f" ] || continue
    f=${f##*/}
    f=${f%.pid}
    stop_pid "$f" "$RUN/$f.pid"
  done
  stop_pid slurmctld "$RUN/slurmctld.pid"
  stop_pid slurmdbd "$RUN/slurmdbd.pid"
  stop_pid mariadbd "$DB_RUN/mysqld.pid"
  if [ -s "$RUN/munged.pid" ]; then # only a munged that this script started
    stop_pid munged "$RUN/munged.pid"
    rm -f /run/munge/munged.pid
  fi
  remove_hosts
  rm -f "$RUN/nodes"
  say "stopped"
}

cmd_status() {
  local f n
  for f in munged mysqld/mysqld slurmdbd slurmctld; do
    if running "$RUN/$f.pid"; then echo "${f#*/}: running (pid $(cat "$RUN/$f.pid"))"; else echo "${f#*/}: not running"; fi
  done
  for n in "${NODE_NAMES[@]}"; do
    f=$RUN/slurmd-$n.pid
    if running "$f"; then echo "slurmd $n: running (pid $(cat "$f"))"; else echo "slurmd $n: not running"; fi
  done
  timeout 10 sinfo 2>&1 || true
}

cmd_smoke() {
  local out jid want
  # one task per node; each prints the node it ran on
  # shellcheck disable=SC2016
  out=$(timeout 60 srun -t 1 -N"$NODES" -n"$NODES" bash -c 'echo $SLURMD_NODENAME' | sort | tr '\n' ' ') || fail "srun failed"
  want=$(printf '%s\n' "${NODE_NAMES[@]}" | sort | tr '\n' ' ')
  [ "$out" = "$want" ] || fail "srun -N$NODES ran on '$out', expected '$want'"
  jid=$(timeout 30 sbatch --parsable -t 1 -N"$NODES" -o "$DIR/jobs/smoke-%j.out" --wrap 'srun echo step-ok') || fail "sbatch failed"
  job_done() { timeout 5 scontrol show job "$jid" | grep -q 'JobState=COMPLETED'; }
  wait_for "job $jid" job_done || fail "smoke job $jid did not complete: $(timeout 5 scontrol show job "$jid" | grep -o 'JobState=[A-Z_]*')"
  [ "$(grep -c step-ok "$DIR/jobs/smoke-$jid.out")" = "$NODES" ] || fail "smoke job output: $(cat "$DIR/jobs/smoke-$jid.out")"
  if [ "$ACCOUNTING" = 1 ]; then
    sacct_done() { timeout 5 sacct -n -X -j "$jid" -o State | grep -q COMPLETED; }
    wait_for "sacct to know job $jid" sacct_done || fail "sacct does not know job $jid"
  fi
  say "smoke test ok (srun on ${NODE_NAMES[*]} + sbatch -N$NODES job $jid)"
}

case "${1:-}" in
  install) cmd_install ;;
  start) cmd_start ;;
  up)
    cmd_install
    cmd_start
    ;;
  down | stop) cmd_stop ;;
  wait)
    use_running_nodes
    cmd_wait
    ;;
  status)
    use_running_nodes
    cmd_status
    ;;
  smoke)
    use_running_nodes
    cmd_smoke
    ;;
  env) echo "export SLURM_CONF=$SLURM_CONF" ;;
  clean)
    cmd_stop
    rm -rf "${DIR:?}/state" "$DIR/log" "$DIR/run" "$DIR/mysql" "$DIR/jobs"
    ;;
  *)
    sed -n '2,11p' "$0" >&2
    exit 2
    ;;
esac
