#!/usr/bin/env bash
# The GPU suite (tests/gpu, marker `gpu`) on one CUDA GPU, in under 10 minutes.
#
#   bash scripts/gpu_check.sh [pytest args]          # from a clone, on the GPU machine
#   PYTHON=/path/to/python bash scripts/gpu_check.sh # another interpreter (default: python3 on PATH)
#
# Uses the machine's own torch (CUDA build) and never replaces it: what is missing is installed with
# `pip --no-deps` or with the torch already there pinned (megatron-core 0.16.1, this package's pure-Python
# dependencies, pytest). Transformer Engine is not installed (a long CUDA build): the TE-spec and FP8 tests
# run only where TE already imports, and are reported as skipped otherwise. Exits non-zero without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

"$PY" - <<'PY'
import torch
if not torch.cuda.is_available():
    raise SystemExit("gpu_check: no CUDA GPU visible to torch " + torch.__version__)
print(f"gpu_check: torch {torch.__version__} on {torch.cuda.get_device_name()} "
      f"(compute capability {'.'.join(map(str, torch.cuda.get_device_capability()))})")
PY

has() { "$PY" -c "import $1" >/dev/null 2>&1; }
TORCH_PIN="torch==$("$PY" -c 'import torch; print(torch.__version__)')"
install() { echo "gpu_check: installing $*"; "$PY" -m pip install --quiet "$@"; }

has megatron.core || install --no-deps "megatron-core==0.16.1"
# megatron-core's and this package's pure-Python dependencies, with the machine's torch held where it is.
missing=()
for pair in packaging:packaging numpy:numpy omegaconf:omegaconf pyarrow:pyarrow PIL:pillow safetensors:safetensors \
            tokenizers:tokenizers psutil:psutil tqdm:tqdm yaml:pyyaml math_verify:math-verify==0.9.0 \
            transformers:"transformers>=5,<6" pytest:pytest pytest_timeout:pytest-timeout; do
  has "${pair%%:*}" || missing+=("${pair#*:}")
done
if ((${#missing[@]})); then
  constraint=$(mktemp); echo "$TORCH_PIN" >"$constraint"
  install -c "$constraint" "${missing[@]}"
  rm -f "$constraint"
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=4 TOKENIZERS_PARALLELISM=false
"$PY" - <<'PY'
import torch
try:
    import transformer_engine  # noqa: F401
    print("gpu_check: Transformer Engine imports: TE-spec tests run" +
          (", FP8 tests run" if torch.cuda.get_device_capability()[0] >= 9 else " (no FP8: GPU older than Hopper)"))
except (ImportError, RuntimeError) as exc:
    print(f"gpu_check: Transformer Engine does not import ({type(exc).__name__}): TE and FP8 tests are skipped")
PY
exec timeout 600 "$PY" -m pytest -q -p no:cacheprovider -rs -m gpu --timeout=300 tests/gpu "$@"
