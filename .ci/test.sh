#!/usr/bin/env bash
# The README's test command (`make test` calls it; CI calls it through .ci/run).
#   bash .ci/test.sh [pytest args...]
# Creates .venv at the repository root if it is missing (python3.11), installs the exact
# versions of requirements.lock and then medrl (`-e . --no-deps`), and runs the whole suite. The SLURM tests run
# when a cluster answers (`bash .ci/slurm/start.sh` starts a one-node one); otherwise they
# are skipped with the reason. Exits with pytest's status; "no tests collected" (5) fails.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"

if [ ! -x .venv/bin/python ]; then
  echo "[test] creating .venv (python3.11)" >&2
  python3.11 -m venv .venv
fi
# the exact locked versions (hashes checked), then medrl itself without re-resolving anything
echo "[test] installing requirements.lock and medrl" >&2
.venv/bin/pip install -q --require-hashes -r requirements.lock
.venv/bin/pip install -q --no-deps --no-build-isolation -e .
.venv/bin/medrl env --check-lock requirements.lock

# stage commands (DVC/Snakemake) call plain `python`: make it the venv's
export PATH="$ROOT/.venv/bin:$PATH"
export DVC_NO_ANALYTICS=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

# SLURM tests: on when a cluster answers, unless the caller decided (MEDRL_TEST_SLURM=0/1)
if [ -z "${MEDRL_TEST_SLURM:-}" ]; then
  if command -v sinfo >/dev/null && scontrol ping 2>/dev/null | grep -q UP && sinfo -h -o %T 2>/dev/null | grep -Eq 'idle|mixed'; then
    export MEDRL_TEST_SLURM=1
    echo "[test] SLURM cluster answers: SLURM tests enabled" >&2
  else
    export MEDRL_TEST_SLURM=0
    echo "[test] no SLURM cluster: SLURM tests will be skipped (start one: bash .ci/slurm/start.sh)" >&2
  fi
fi

set +e
.venv/bin/pytest -q -rs --durations=25 "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "[test] pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
