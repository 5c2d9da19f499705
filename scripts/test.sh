#!/usr/bin/env bash
# Run the whole test suite on CPU (sets up .venv first if needed). This is what CI runs.
#
#   bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false PYTHONHASHSEED=0
exec .venv/bin/python -m pytest -q -p no:cacheprovider --timeout=900 "$@"
