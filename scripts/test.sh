#!/usr/bin/env bash
# Run the whole test suite on CPU (sets up .venv first if needed). This is what CI runs.
#
#   bash scripts/test.sh [pytest args]
#
# The tests marked `slurm` submit real jobs to a local single-node Slurm: when none is running, this starts one
# (scripts/local_slurm.sh: installs Slurm 22.05 with apt-get the first time, as root) and stops it at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false PYTHONHASHSEED=0
started_slurm=""
if ! bash scripts/local_slurm.sh status >/dev/null 2>&1; then
  bash scripts/local_slurm.sh start --gpus 1
  started_slurm=1
fi
trap '[ -z "$started_slurm" ] || bash scripts/local_slurm.sh stop' EXIT
.venv/bin/python -m pytest -q -p no:cacheprovider --timeout=900 "$@"
