#!/usr/bin/env bash
# Start a one-node SLURM cluster (munge + slurmctld + slurmd) on this machine, as root.
# Idempotent: installs Debian's slurm-wlm/munge if missing, (re)writes /etc/slurm/slurm.conf
# from slurm.conf.in, starts only the daemons that are not running, and waits until the
# node is idle. Exits non-zero (with the daemons' logs) if the cluster does not come up.
#   bash .ci/slurm/start.sh          # start / verify
#   bash .ci/slurm/stop.sh           # stop what this script started
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STATE="${MEDRL_SLURM_STATE:-/var/lib/medrl-slurm}"
CONF=/etc/slurm/slurm.conf

log() { echo "[slurm] $*" >&2; }
die() { log "ERROR: $*"; for f in "$STATE"/slurmctld.log "$STATE"/slurmd.log /var/log/munge/munged.log; do
          [ -f "$f" ] && { echo "--- tail $f" >&2; tail -n 30 "$f" >&2; }; done; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (installs packages and starts daemons)"

# ---------------------------------------------------------------- packages
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  log "installing slurm-wlm and munge (Debian packages)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq slurm-wlm munge >/dev/null
fi

# ---------------------------------------------------------------- munge
if [ ! -s /etc/munge/munge.key ]; then
  log "creating /etc/munge/munge.key"
  mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
    || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown munge:munge /etc/munge /etc/munge/munge.key
chmod 0700 /etc/munge
chmod 0400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  log "starting munged"
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 1 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
  munge -n | unmunge >/dev/null 2>&1 || die "munged did not start"
fi

# ---------------------------------------------------------------- slurm.conf
node_line="$(slurmd -C | head -n 1)"
NODE="$(sed -n 's/^NodeName=\([^ ]*\).*/\1/p' <<<"$node_line")"
CPUS="$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$node_line")"
MEM="$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$node_line")"
[ -n "$NODE" ] && [ -n "$CPUS" ] && [ -n "$MEM" ] || die "cannot parse \`slurmd -C\`: $node_line"
install -d -m 0755 "$STATE" "$STATE/slurmd" "$STATE/slurmctld" /etc/slurm
new_conf="$(sed -e "s|@NODE@|$NODE|g" -e "s|@CPUS@|$CPUS|g" -e "s|@MEM@|$MEM|g" -e "s|@STATE@|$STATE|g" \
  "$HERE/slurm.conf.in")"
restart=0
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$new_conf" ]; then
  log "writing $CONF (node $NODE, $CPUS CPUs, ${MEM} MB)"
  [ -f "$CONF" ] && cp "$CONF" "$CONF.medrl-backup"
  printf '%s\n' "$new_conf" > "$CONF"
  restart=1
fi

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
stop_pidfile() { if running "$1"; then kill "$(cat "$1")"; for _ in $(seq 1 20); do running "$1" || break; sleep 0.5; done; fi; }
if [ "$restart" = 1 ]; then
  stop_pidfile "$STATE/slurmd.pid"
  stop_pidfile "$STATE/slurmctld.pid"
fi

# ---------------------------------------------------------------- daemons
if ! running "$STATE/slurmctld.pid"; then
  log "starting slurmctld"
  /usr/sbin/slurmctld -c    # -c: clear previous job state (a CI cluster holds no jobs worth keeping)
fi
for _ in $(seq 1 30); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 1; done
scontrol ping 2>/dev/null | grep -q UP || die "slurmctld not responding"
if ! running "$STATE/slurmd.pid"; then
  log "starting slurmd"
  /usr/sbin/slurmd
fi

# ---------------------------------------------------------------- wait for an idle node
for i in $(seq 1 60); do
  state="$(sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n 1)"
  case "$state" in
    idle|mixed|allocated|completing) log "node $NODE is $state; cluster up"; sinfo >&2; exit 0 ;;
    down*|drain*|drained*|fail*)
      # a leftover DOWN/DRAIN from an earlier start (e.g. a changed memory size)
      scontrol update nodename="$NODE" state=resume 2>/dev/null || true ;;
  esac
  sleep 1
done
die "node $NODE did not become idle (state: ${state:-unknown})"
