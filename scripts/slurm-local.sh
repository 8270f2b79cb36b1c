#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for tests/test_slurm.py and trying the SLURM launcher
# (Debian bookworm: slurm-wlm, munge; run as root or with sudo). No systemd needed: the daemons are
# started directly. Safe to run again: it rewrites the config and restarts slurmctld and slurmd.
#   bash scripts/slurm-local.sh            then: sinfo; python train.py -m hydra/launcher=slurm ...
# Environment: SLURM_LOCAL_TIMEOUT (seconds to wait for the node to be idle, default 60);
# SLURM_LOCAL_FORCE=1 to replace an /etc/slurm/slurm.conf this script did not write.
set -euo pipefail

timeout_s=${SLURM_LOCAL_TIMEOUT:-60}
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi

die() {
  echo "slurm-local: error: $*" >&2
  exit 1
}

# 1. Packages.
missing=()
for p in slurm-wlm munge; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "slurm-local: installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# 2. Config: this host, its CPUs, and a little less memory than it has (slurmd drains a node that
# reports less memory than configured).
host=$(hostname -s)
cpus=$(nproc)
mem_mb=$(free -m | awk '/^Mem:/ {print $2}')
real_mb=$((mem_mb * 9 / 10))
[ "$real_mb" -gt 0 ] || die "could not read the memory size from 'free -m'"
marker="# Written by scripts/slurm-local.sh"
if [ -f /etc/slurm/slurm.conf ] && ! grep -q "^$marker" /etc/slurm/slurm.conf && [ -z "${SLURM_LOCAL_FORCE:-}" ]; then
  die "/etc/slurm/slurm.conf was not written by this script (a real cluster's?);" \
    "not replacing it (SLURM_LOCAL_FORCE=1 does)"
fi
conf=$(mktemp)
cat >"$conf" <<EOF
$marker: a single-node cluster on $host, no accounting database.
ClusterName=modelpatch
SlurmctldHost=$host(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# Short waits for a test cluster: a requeued job may start again after cred_expire seconds (default
# 120), and the main and backfill schedulers run every sched_interval, bf_interval seconds (60, 30).
AuthInfo=cred_expire=10
SchedulerParameters=bf_interval=2,sched_interval=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
KillWait=10
InactiveLimit=0
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$real_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
$sudo install -d -m 0755 /etc/slurm
$sudo install -m 0644 "$conf" /etc/slurm/slurm.conf
rm -f "$conf"
$sudo install -d -o slurm -g slurm -m 0755 /var/spool/slurmctld /var/log/slurm
$sudo install -d -m 0755 /var/spool/slurmd

# 3. Munge: a key if there is none, then the daemon (left running if it already answers).
if [ ! -s /etc/munge/munge.key ]; then
  echo "slurm-local: creating /etc/munge/munge.key"
  $sudo install -d -o munge -g munge -m 0700 /etc/munge
  $sudo dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  $sudo chown munge:munge /etc/munge/munge.key
  $sudo chmod 0400 /etc/munge/munge.key
fi
$sudo install -d -o munge -g munge -m 0755 /run/munge
$sudo install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  if [ -f /run/munge/munged.pid ] && $sudo kill -0 "$(cat /run/munge/munged.pid)" 2>/dev/null; then
    $sudo kill "$(cat /run/munge/munged.pid)" || true
    sleep 1
  fi
  echo "slurm-local: starting munged"
  if command -v runuser >/dev/null; then
    $sudo runuser -u munge -- /usr/sbin/munged
  else
    $sudo /usr/sbin/munged --force
  fi
  for _ in $(seq 20); do
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
    sleep 0.5
  done
  munge -n | unmunge >/dev/null || die "munged does not answer (see /var/log/munge/munged.log)"
fi

# 4. SLURM daemons: stop the ones a previous run started (by their pid files), then start both.
stop() { # name pidfile
  local pid
  [ -f "$2" ] || return 0
  pid=$(cat "$2")
  if [ -n "$pid" ] && $sudo kill -0 "$pid" 2>/dev/null; then
    echo "slurm-local: restarting $1 (pid $pid)"
    $sudo kill "$pid" || true
    for _ in $(seq 50); do
      $sudo kill -0 "$pid" 2>/dev/null || break
      sleep 0.2
    done
    if $sudo kill -0 "$pid" 2>/dev/null; then $sudo kill -9 "$pid" || true; fi
  fi
  $sudo rm -f "$2"
}
stop slurmd /run/slurmd.pid
stop slurmctld /run/slurmctld.pid
$sudo /usr/sbin/slurmctld || die "slurmctld did not start (see /var/log/slurm/slurmctld.log)"
$sudo /usr/sbin/slurmd || die "slurmd did not start (see /var/log/slurm/slurmd.log)"

# 5. Wait for the node to be idle (a node the controller remembers as down is resumed).
deadline=$((SECONDS + timeout_s))
state=""
while [ $SECONDS -lt $deadline ]; do
  state=$(sinfo -h -N -n "$host" -o %t 2>/dev/null | head -n1 || true)
  case "$state" in
    idle | mix | alloc) break ;;
    down* | drain* | drng*) $sudo scontrol update nodename="$host" state=resume 2>/dev/null || true ;;
  esac
  sleep 1
done
case "$state" in
  idle | mix | alloc) ;;
  *)
    tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
    die "node $host is '${state:-not reported}' after ${timeout_s}s, not idle (logs above; sinfo -R says why)"
    ;;
esac
echo "slurm-local: node $host ($cpus CPUs, ${real_mb} MB) is $state in partition debug"
sinfo
