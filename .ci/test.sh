#!/usr/bin/env bash
# The README's test command (`make test` calls it; CI calls it through .ci/run).
#   bash .ci/test.sh [pytest args...]
# Creates .venv at the repository root if it is missing (python3.11), installs torch 2.14.1 /
# torchvision 0.29.1 and then `-e .[test]`, and runs the whole suite. The SLURM tests run
# when a cluster answers (`bash .ci/slurm/start.sh` starts a one-node one); otherwise they
# are skipped with the reason. Exits with pytest's status; "no tests collected" (5) fails.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"

if [ ! -x .venv/bin/python ]; then
  echo "[test] creating .venv (python3.11)" >&2
  python3.11 -m venv .venv
fi
# torch first, pinned (pip's own config decides the index / local wheel dirs)
if ! .venv/bin/python - <<'PY' 2>/dev/null
import torch, torchvision
assert torch.__version__.split("+")[0] == "2.14.1" and torchvision.__version__.split("+")[0] == "0.29.1"
PY
then
  echo "[test] installing torch==2.14.1 torchvision==0.29.1" >&2
  .venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
fi
echo "[test] installing medrl (-e .[test])" >&2
.venv/bin/pip install -q -e '.[test]'

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
