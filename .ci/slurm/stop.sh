#!/usr/bin/env bash
# Stop the one-node SLURM cluster started by .ci/slurm/start.sh (slurmd, slurmctld, munged).
set -uo pipefail
STATE="${MEDRL_SLURM_STATE:-/var/lib/medrl-slurm}"
stop_pidfile() {
  local f="$1"
  [ -f "$f" ] || return 0
  local pid; pid="$(cat "$f")"
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  fi
}
stop_pidfile "$STATE/slurmd.pid"
stop_pidfile "$STATE/slurmctld.pid"
if [ "${1:-}" = "--all" ]; then
  stop_pidfile /run/munge/munged.pid
fi
echo "[slurm] stopped" >&2
