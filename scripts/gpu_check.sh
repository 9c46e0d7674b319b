#!/usr/bin/env bash
# The CUDA backend's check on a GPU machine, in one command that fits the project's GPU window (docs/performance.md,
# "Running the GPU check"): the op and model tests (tests/cuda), then `moerun bench` in bf16 and FP8 at batches 1, 8
# and 64 on a few layers (each decode timed through the CUDA-graph runner and eagerly), with transformers alongside
# (eager, static cache, and torch.compile in its own step). Logs and JSON go to OUTDIR; a summary table against the
# backend's targets ends the run. Exit code 0: every step passed (the targets are reported, not enforced).
#
#   scripts/gpu_check.sh OUTDIR             on the GPU machine, from the repository root of a copy of the tree
#   scripts/gpu_check.sh OUTDIR --dry-run   the same steps on the CPU under Triton's interpreter, tiny sizes (CI)
#
# Nothing is installed: moerun is made importable from this tree by a link farm on PYTHONPATH (its packages map to
# the folders runtime/, backends/, configs/ as pyproject.toml's package-dir says). Every step runs under `timeout`,
# capped by what is left of GPU_CHECK_BUDGET seconds (default 470), so one hang cannot eat the whole window.
set -u

usage() { echo "usage: scripts/gpu_check.sh OUTDIR [--dry-run]" >&2; exit 2; }
[ $# -ge 1 ] && [ $# -le 2 ] || usage
OUT=$1
DRY=0
if [ $# -eq 2 ]; then [ "$2" = "--dry-run" ] && DRY=1 || usage; fi
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null || PY=python
# The dry run is not bound by the GPU window; the interpreter on a shared CPU is slow: 4x the limits.
SCALE=$([ "$DRY" = 1 ] && echo 4 || echo 1)
BUDGET=${GPU_CHECK_BUDGET:-$((470 * SCALE))}
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
: > "$OUT/steps.tsv"
: > "$OUT/gpu_check.log"

SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
mkdir -p "$SCRATCH/moerun"
for pkg in runtime backends configs __main__.py; do ln -s "$ROOT/$pkg" "$SCRATCH/moerun/$pkg"; done
export PYTHONPATH="$SCRATCH${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
cd "$ROOT" || exit 2

START=$(date +%s)
# step NAME LIMIT_SECONDS CMD...: runs CMD under timeout (LIMIT, or what is left of the budget), its output appended
# to OUTDIR/gpu_check.log; one line per step in OUTDIR/steps.tsv: name, exit code, seconds, limit. OUTDIR holds 8
# files at most (what the device tool brings back): gpu_check.log, steps.tsv, env.json, tests.xml, three bench
# JSON files, summary.json.
step() {
    local name=$1 limit=$(($2 * SCALE))
    shift 2
    local left=$((BUDGET - ($(date +%s) - START)))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 5 ]; then
        printf '%s\t%s\t%s\t%s\n' "$name" "skipped" 0 0 >> "$OUT/steps.tsv"
        echo "== $name: skipped, the ${BUDGET}s budget is spent"
        return
    fi
    echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/gpu_check.log"
    local t0 rc
    t0=$(date +%s)
    timeout -k 10 "$limit" "$@" > "$SCRATCH/step.log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - t0))" "$limit" >> "$OUT/steps.tsv"
    cat "$SCRATCH/step.log" >> "$OUT/gpu_check.log"
    echo "== $name: exit code $rc after $(($(date +%s) - t0))s" >> "$OUT/gpu_check.log"
    tail -n 3 "$SCRATCH/step.log" | sed 's/^/   /'
}

if [ "$DRY" = 1 ]; then
    CONFIG="$SCRATCH/cuda_interpreted.yaml"
    printf 'backend: cuda\nmodel: {path: "builtin:demo", dtype: bfloat16}\nkv_cache: {block_size: 16}\ncuda: {device: cpu}\n' > "$CONFIG"
    BENCH=(env TRITON_INTERPRET=1 "$PY" -m moerun bench -c "$CONFIG" --small --layers 1 --context 8 --steps 1 --warmup 0)
    BATCHES=1,2
    PREFILL=(--prefill-tokens 8)
    COMPILED_BATCH=1
else
    CONFIG="$ROOT/configs/cuda_demo.yaml"
    BENCH=("$PY" -m moerun bench -c "$CONFIG" --full --layers 4)
    BATCHES=1,8,64
    PREFILL=()
    COMPILED_BATCH=64
fi

step env 60 "$PY" "$ROOT/scripts/gpu_check_env.py" "$OUT/env.json" $([ "$DRY" = 1 ] && echo --dry-run)
step tests 200 "$PY" -m pytest -q -p no:cacheprovider -rs tests/cuda --junitxml="$OUT/tests.xml"
step bench-bf16 120 "${BENCH[@]}" --batches "$BATCHES" ${PREFILL[@]+"${PREFILL[@]}"} --compare transformers \
    --hf-variants dynamic,static --out "$OUT/bench-bf16.json"
step bench-fp8 90 "${BENCH[@]}" --fp8 --batches "$BATCHES" ${PREFILL[@]+"${PREFILL[@]}"} --out "$OUT/bench-fp8.json"
step bench-hf-compiled 100 "${BENCH[@]}" --batches "$COMPILED_BATCH" --prefill-tokens 0 --compare transformers \
    --hf-variants compiled --out "$OUT/bench-hf-compiled.json"

"$PY" "$ROOT/scripts/gpu_check_summary.py" "$OUT" $([ "$DRY" = 1 ] && echo --dry-run) | tee -a "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
