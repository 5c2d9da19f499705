#!/usr/bin/env bash
# Download, here (where a package registry is reachable), the wheels the GPU probe's policy tier needs on an
# OFFLINE GPU node that has its own CUDA torch, and write OUT/manifest.txt (name, version, size, sha256 of each).
#
#   bash scripts/gpu_wheels.sh OUT [--python-version 3.12] [--platform manylinux_2_28_x86_64 ...]
#                                  [--python PY] [--limit-mib 64]
#
# Then carry OUT to the node and run there:  bash scripts/gpu_check.sh --wheels OUT --out RESULTS
#
# What travels is what the policy tier (mmupt_megatron's engines/megatron_policy, models/, distributed/,
# algorithms/, trainer/workers + checkpoints; tests/gpu) imports and such a node lacks (see
# /work/shared/STACK.md "Found in 2026-12": Python 3.12, torch 2.11+cu130, transformers 5.17, numpy, safetensors,
# tokenizers, pillow, pyyaml, psutil, packaging, einops, sympy, tqdm, pytest + pytest-timeout are there):
#   megatron-core 0.16.1         the policy (cp311 and cp312 wheels exist; needs torch, numpy, packaging)
#   omegaconf 2.3.1 + antlr4-python3-runtime 4.9.3    mmupt_megatron's config (antlr4 4.9.3 is an sdist only:
#                                                      built here into its pure-Python py3-none-any wheel)
#   math-verify 0.9.0 + latex2sympy2_extended 1.11.0  the answer grader (needs sympy and antlr4 4.9.3 too)
#   mmupt-megatron (this checkout)                     built here with `pip wheel --no-deps`
# Never torch, CUDA libraries or triton: the node's own stay in place (gpu_check.sh refuses such wheels).
# OUT/node-requirements.txt lists what the node is expected to have already (a stand-in for a CPU dry run:
# tests/test_gpu_probe_offline_on_cpu.py installs it into a fresh venv next to torch).
# Existing *.whl files in OUT are removed first (two versions of one package would stop the install there).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)

usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
OUT=""; PYVER=3.12; PLATFORMS=(); PY=${PYTHON:-python3}; LIMIT_MIB=64
while (($#)); do
  case "$1" in
    --python-version) PYVER=$2; shift 2 ;;
    --platform) PLATFORMS+=("$2"); shift 2 ;;
    --python) PY=$2; shift 2 ;;
    --limit-mib) LIMIT_MIB=$2; shift 2 ;;
    -h|--help) usage ;;
    -*) echo "gpu_wheels: unknown option $1" >&2; usage ;;
    *) [ -z "$OUT" ] || usage; OUT=$1; shift ;;
  esac
done
[ -n "$OUT" ] || usage
((${#PLATFORMS[@]})) || PLATFORMS=(manylinux_2_28_x86_64)
# pip matches platform tags exactly: add the older manylinux tags and pure-Python wheels' `any`
case "${PLATFORMS[*]}" in *x86_64*) PLATFORMS+=(manylinux_2_17_x86_64 manylinux2014_x86_64) ;; esac
PLATFORMS+=(any)
platform_args=(); for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done

# name==version of the wheels downloaded as binaries, and of pure-Python sdists built here into wheels
BINARY=(megatron-core==0.16.1 omegaconf==2.3.1 math-verify==0.9.0 latex2sympy2_extended==1.11.0)
PURE_SDIST=(antlr4-python3-runtime==4.9.3)

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
rm -f "$OUT"/*.whl "$OUT"/manifest.txt
start=$SECONDS
echo "gpu_wheels: downloading for Python $PYVER (${PLATFORMS[*]}) into $OUT"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  "${platform_args[@]}" -d "$OUT" "${BINARY[@]}"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for spec in "${PURE_SDIST[@]}"; do
  "$PY" -m pip wheel --quiet --no-deps -w "$work/pure" "$spec"
done
for whl in "$work"/pure/*.whl; do
  case "$(basename "$whl")" in
    *-py3-none-any.whl|*-py2.py3-none-any.whl) mv "$whl" "$OUT"/ ;;
    *) echo "gpu_wheels: $(basename "$whl") is not a pure-Python wheel: it cannot travel to Python $PYVER" >&2; exit 1 ;;
  esac
done

# this checkout's package, built from a copy (an in-tree build would leave build/ and *.egg-info behind)
mkdir -p "$work/src"
cp "$ROOT/pyproject.toml" "$ROOT/README.md" "$work/src/"
[ ! -e "$ROOT/LICENSE" ] || cp "$ROOT/LICENSE" "$work/src/"
(cd "$ROOT" && tar --exclude='__pycache__' --exclude='*.pyc' -cf - mmupt_megatron) | tar -xf - -C "$work/src"
isolation=(--no-build-isolation)
"$PY" - <<'PY' 2>/dev/null || isolation=()  # setuptools >= 68 here: build without downloading it
import setuptools, sys
sys.exit(int(setuptools.__version__.split(".")[0]) < 68)
PY
"$PY" -m pip wheel --quiet --no-deps "${isolation[@]}" -w "$OUT" "$work/src"

"$PY" "$ROOT/tools/gpu_probe.py" manifest "$OUT" --limit-mib "$LIMIT_MIB" --python-version "$PYVER" \
  --package-root "$ROOT"
echo "gpu_wheels: done in $((SECONDS - start)) s: $OUT/manifest.txt"
