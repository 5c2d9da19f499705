#!/usr/bin/env bash
# The GPU probe: the GPU suite (tests/gpu, marker `gpu`) and the environment it runs in, on one CUDA GPU of a
# node that may be OFFLINE; every stage is cut to fit a 500 s budget, so it ends within 9 minutes (never run on a
# GPU yet: the CPU dry run takes ~80-160 s on 2 cores). Nothing is downloaded and the node's torch is never
# touched: what the node lacks arrives as wheel files (scripts/gpu_wheels.sh, run where a registry is reachable).
#
#   bash scripts/gpu_wheels.sh WHEELS                           # here: megatron-core, ..., this package (~3.3 MiB)
#   bash scripts/gpu_check.sh --wheels WHEELS --out RESULTS     # on the node, from a checkout
#   bash scripts/gpu_check.sh --wheels WHEELS --device cpu      # the same stages on CPU (a dry run, no GPU)
#
# Options: --python PY (default: $PYTHON or python3: the node's Python with its CUDA torch), --out DIR (default
# runs/gpu_check), --site DIR (where the wheels are installed; default ${TMPDIR:-/tmp}/mmupt_gpu_site),
# --budget-s S (all stages together, default 500), --device cuda|cpu; arguments after `--` go to every pytest.
#
# Stages, each under its own `timeout`, each logged to OUT/logs/STAGE.log, the probe going on past a failure:
#   install        pip install --no-index --no-deps --target SITE WHEELS/*.whl (sha256 checked against
#                  WHEELS/manifest.txt; torch, CUDA and triton wheels refused); SITE goes first on PYTHONPATH
#   env            python, torch, CUDA, the device and its free memory, what imports and from where (wheels /
#                  checkout / node): OUT/env.json
#   policy         tests/gpu/test_policy_on_gpu.py: the Megatron policy in bf16 (local spec; TE spec and FP8
#                  where Transformer Engine imports), logits vs transformers, one GRPO step, packed rows,
#                  offload / onload freeing and restoring memory
#   policy-worker  tests/gpu/test_policy_worker_on_gpu.py: the trainer's PolicyWorker: GRPO with old log-probs
#                  and KL to a reference, log-probs returned in host memory, offload / onload, a checkpoint
#                  save (its memory peak) and load
#   ipc-refit      tests/gpu/test_cuda_ipc_refit_on_gpu.py: CUDA-IPC buckets into a second process, and the
#                  policy's own refit (send_refit + HandleSender) into one, bit-exact
#   engine         where vLLM and Ray import: a real vLLM engine (tests/engines/test_vllm_rollout_on_cpu.py:
#                  sampling, seeds, refit); else "skipped: vllm/ray not importable" (not a failure)
# OUT gets summary.txt (stage, status, seconds, one-line result; also printed), summary.tsv, stages.tsv,
# env.json, probe_record.jsonl (figures the tests measured: memory resident / offloaded / during the save, ...)
# and, where nvidia-smi exists, memory_trace.csv (GPU memory every 0.5 s; each stage's peak is in the summary);
# OUT/logs.tar.gz bundles all of it. Exit status 1 if a stage failed or timed out, else 0.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

usage() { sed -n '2,33p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
PY=${PYTHON:-python3}; WHEELS=""; OUT="$ROOT/runs/gpu_check"; DEVICE=cuda; BUDGET=500
SITE="${TMPDIR:-/tmp}/mmupt_gpu_site"; PYTEST_EXTRA=()
while (($#)); do
  case "$1" in
    --wheels) WHEELS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --device) DEVICE=$2; shift 2 ;;
    --python) PY=$2; shift 2 ;;
    --site) SITE=$2; shift 2 ;;
    --budget-s) BUDGET=$2; shift 2 ;;
    --) shift; PYTEST_EXTRA=("$@"); break ;;
    -h|--help) usage ;;
    *) echo "gpu_check: unknown argument $1" >&2; usage ;;
  esac
done
case "$DEVICE" in cuda|cpu) ;; *) echo "gpu_check: --device must be cuda or cpu" >&2; exit 2 ;; esac
command -v "$PY" >/dev/null 2>&1 || { echo "gpu_check: no python at $PY" >&2; exit 2; }
mkdir -p "$OUT/logs"
OUT=$(cd "$OUT" && pwd)
rm -f "$OUT"/logs/*.log "$OUT"/stages.tsv "$OUT"/summary.txt "$OUT"/summary.tsv "$OUT"/env.json \
      "$OUT"/probe_record.jsonl "$OUT"/memory_trace.csv "$OUT"/logs.tar.gz
T0=$SECONDS

# ------------------------------------------------------------------ the stages' environment
# the wheels' folder first (only when this run installs it: a folder left by an earlier run is not used)
if [ -n "$WHEELS" ]; then export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
else export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"; fi
export MMUPT_GPU_SUITE_DEVICE=$DEVICE MMUPT_GPU_PROBE_RECORD="$OUT/probe_record.jsonl"
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ "$DEVICE" = cpu ]; then
  export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
fi

TRACE_PID=""
cleanup() { [ -z "$TRACE_PID" ] || kill "$TRACE_PID" 2>/dev/null; }
trap cleanup EXIT
if [ "$DEVICE" = cuda ] && command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=timestamp,index,memory.used,memory.total,utilization.gpu --format=csv,noheader,nounits \
    -lms 500 >"$OUT/memory_trace.csv" 2>/dev/null &
  TRACE_PID=$!
fi

now() { date +%s.%N; }
# record NAME STATUS SECONDS START END RC NOTE
record() { printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$OUT/stages.tsv"; }
# stage NAME TIMEOUT_S CMD...: run CMD under `timeout` (capped by what is left of the budget), log it, record it
stage() {
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - (SECONDS - T0)))
  if ((left < 20)); then
    record "$name" skip 0 "$(now)" "$(now)" "" "skipped: out of time (--budget-s $BUDGET)"
    echo "gpu_check: $name skipped: out of time"; return 0
  fi
  ((limit <= left - 10)) || limit=$((left - 10))
  echo "gpu_check: $name (timeout ${limit} s) ..."
  local start end rc status
  start=$(now)
  timeout --kill-after=15 "$limit" "$@" >"$OUT/logs/$name.log" 2>&1
  rc=$?
  end=$(now)
  case $rc in 0) status=pass ;; 124|137) status=TIMEOUT ;; *) status=FAIL ;; esac
  local note=""; [ "$status" != TIMEOUT ] || note="timed out after ${limit} s"
  record "$name" "$status" "$(awk -v a="$start" -v b="$end" 'BEGIN{printf "%.1f", b-a}')" "$start" "$end" "$rc" "$note"
  echo "gpu_check: $name $status ($rc) in $(awk -v a="$start" -v b="$end" 'BEGIN{printf "%.0f", b-a}') s"
}
skip() { record "$1" skip 0 "$(now)" "$(now)" "" "$2"; echo "gpu_check: $1 $2"; }

# ------------------------------------------------------------------ 1. install the wheels
install_wheels() {
  set -e
  "$PY" tools/gpu_probe.py verify "$WHEELS"
  rm -rf "$SITE"
  "$PY" -m pip install --no-index --no-deps --no-cache-dir --disable-pip-version-check --no-compile \
    --target "$SITE" "$WHEELS"/*.whl
  echo "RESULT: $(ls "$WHEELS"/*.whl | wc -l) wheels into $SITE ($(du -sm "$SITE" | cut -f1) MiB installed)"
}
if [ -n "$WHEELS" ]; then
  WHEELS=$(cd "$WHEELS" && pwd)
  stage install 180 bash -c "$(declare -f install_wheels); PY='$PY' WHEELS='$WHEELS' SITE='$SITE' install_wheels"
else
  skip install "skipped: no --wheels (the interpreter's own packages are used)"
fi

# ------------------------------------------------------------------ 2. versions and environment
stage env 120 "$PY" tools/gpu_probe.py env --device "$DEVICE" --site "$SITE" --json "$OUT/env.json"

# ------------------------------------------------------------------ 3. the policy tier (tests/gpu)
PYTEST=("$PY" -P -m pytest -q -p no:cacheprovider -rfEs -m gpu --import-mode=append -o addopts=--strict-markers)
if "$PY" -c "import pytest_timeout" >/dev/null 2>&1; then PYTEST+=(--timeout=240); fi
TMPBASE=$(mktemp -d "${TMPDIR:-/tmp}/mmupt_gpu_check.XXXXXX")
stage policy 300 "${PYTEST[@]}" --basetemp="$TMPBASE/policy" tests/gpu/test_policy_on_gpu.py "${PYTEST_EXTRA[@]}"
stage policy-worker 180 "${PYTEST[@]}" --basetemp="$TMPBASE/worker" tests/gpu/test_policy_worker_on_gpu.py "${PYTEST_EXTRA[@]}"
stage ipc-refit 150 "${PYTEST[@]}" --basetemp="$TMPBASE/ipc" tests/gpu/test_cuda_ipc_refit_on_gpu.py "${PYTEST_EXTRA[@]}"

# ------------------------------------------------------------------ 4. the engine tier (vLLM + Ray)
left=$((BUDGET - (SECONDS - T0) - 30)); ((left < 60)) || left=60  # importing vLLM takes ~20 s
if ((left <= 0)); then
  skip engine "skipped: out of time (--budget-s $BUDGET)"
elif [ "$DEVICE" = cuda ] && ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" >/dev/null 2>&1; then
  skip engine "skipped: no CUDA device (see env)"
elif timeout "$left" "$PY" -c "import vllm, ray" >/dev/null 2>&1; then
  ENGINE_TESTS="n_samples_per_prompt or seeded_runs_reproduce or refit_changes_logprobs or bad_refit_names"
  stage engine 180 "$PY" -P -m pytest -q -p no:cacheprovider -rfEs --import-mode=append -o addopts=--strict-markers \
    --basetemp="$TMPBASE/engine" tests/engines/test_vllm_rollout_on_cpu.py -k "$ENGINE_TESTS" "${PYTEST_EXTRA[@]}"
else
  skip engine "skipped: vllm/ray not importable"
fi
rm -rf "$TMPBASE"

# ------------------------------------------------------------------ summary
cleanup; TRACE_PID=""
echo
"$PY" tools/gpu_probe.py summary "$OUT"
rc=$?
(cd "$OUT" && tar -czf logs.tar.gz --exclude=logs.tar.gz -- *) 2>/dev/null
echo "gpu_check: $((SECONDS - T0)) s in all; results in $OUT (summary.txt, logs/, logs.tar.gz)"
exit $rc
