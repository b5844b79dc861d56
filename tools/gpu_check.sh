#!/usr/bin/env bash
# The prepared GPU check: one command on a CUDA machine (H100/H200).
#
#     bash tools/gpu_check.sh DIR        # run from anywhere; DIR receives every result and log
#     STEPS="tests e2e" bash tools/gpu_check.sh DIR      # only some steps (the packages step always runs)
#
# On the device tool ($OUT brings back at most 8 files): `bash tools/gpu_check.sh /tmp/gc;
# rc=$?; tar -czf $OUT/gpu_check.tgz -C /tmp/gc --exclude cache --exclude site .; exit $rc`.
#
# Steps (each logged to DIR/<step>.log, exit codes in DIR/summary.txt; a failed step does not stop
# the others, the script exits non-zero if any failed):
#   0. packages: Python packages this machine lacks are installed from tools/wheels/*.whl (no index, no
#      network; see tools/wheels/README.md), each only if its distribution is not installed already;
#      then dustin_kernels itself, editable, without dependencies or build isolation;
#   tests: the GPU tier, `pytest -m gpu` with TRITON_INTERPRET=0 (compiled Triton on CUDA tensors): the ops
#      against the float64 references at model shapes, the last-arrival merges under real concurrency, a
#      captured step's kernels replayed on new inputs, and the compiled decode step under CUDA graphs
#      (tests/test_gpu_step.py: the e2e step's preflight);
#   generate: the generator's demo on CUDA (`generate --demo --fidelity`: the retrieval testbed, every
#      policy side by side);
#   tune: qwen2.5-72b attention (the 'headline' grid: batch 16, contexts 8K/16K/32K, budget 512, every
#      kernel and workload) under a time budget, into DIR/perf_db (trial log and Optuna journal in
#      DIR/autotune);
#   bench: tools/bench_kernels.py on the same shapes, with dispatch reading DIR/perf_db;
#   perf_check: DIR/perf_db validated, its coverage and compiles checked, its entries re-measured
#      against the default rule and the dense baseline (tools/perf_check.py --gpu);
#   e2e: tools/bench_e2e.py on the retrieval testbed at the Qwen2.5-7B attention shape (12 layers; the draft
#      with 1 KV head: its cache a quarter of the target's per layer, as Qwen2.5-0.5B's is of Qwen2.5-7B's),
#      batch 4, contexts 8K/16K/32K, budget 512: plain / dense / dustin / streaming / quest, each step one
#      compiled graph replayed as a CUDA graph (one Inductor compile per policy: most of this step's time),
#      and the eager step profiled by phase (host and device ms, launches, syncs, top ops), with
#      DIR/perf_db when the tune step made it (DIR/e2e).
# All steps take an estimated 13-15 minutes, more than a device session has: pick with STEPS, e.g.
# "tests e2e" (the end-to-end figures: the tests took 96 s in session 2, before tests/test_gpu_step.py; e2e
# is not timed yet, an estimate is 5 minutes, mostly compiling) or "tests tune bench perf_check" (the kernels, about 8 minutes).
# Knobs (environment): STEPS (default: all, in the order above), TUNE_SECONDS (default 150), JOBS
# (default min(8, CPUs)), PYTHON (default python3), TOTAL_SECONDS (default 480: every step's limit is
# cut to what is left of it; a step cut short fails and says so).
set -uo pipefail

if [ $# -ne 1 ]; then
    echo "usage: bash tools/gpu_check.sh DIR" >&2
    exit 2
fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$1"
DIR="$(cd "$1" && pwd)"
PYTHON="${PYTHON:-python3}"
TUNE_SECONDS="${TUNE_SECONDS:-150}"
TOTAL_SECONDS="${TOTAL_SECONDS:-480}"
ALL_STEPS="tests generate tune bench perf_check e2e"
STEPS="${STEPS:-$ALL_STEPS}"
for name in $STEPS; do
    [[ " $ALL_STEPS " == *" $name "* ]] || { echo "STEPS: unknown step '$name' (expected some of: $ALL_STEPS)" >&2; exit 2; }
done
JOBS="${JOBS:-$(( $(nproc) < 8 ? $(nproc) : 8 ))}"
export PYTHONUNBUFFERED=1 DUSTIN_CACHE_DIR="$DIR/cache"
unset TRITON_INTERPRET DUSTIN_PERF_DB
cd "$REPO" || exit 2
: > "$DIR/summary.txt"
FAILED=0
START=$SECONDS

step() {  # step NAME TIMEOUT_S COMMAND... : run with a time limit, log, record the exit code
    local name=$1 limit=$2 left=$((TOTAL_SECONDS - (SECONDS - START)))
    shift 2
    [[ " wheels install $STEPS " == *" $name "* ]] || return 0
    [ "$limit" -le "$left" ] || limit=$left
    if [ "$limit" -le 0 ]; then
        echo "== $name: skipped, the ${TOTAL_SECONDS} s of the run are spent" | tee -a "$DIR/summary.txt"
        FAILED=1
        return 1
    fi
    echo "== $name (limit ${limit}s): $*" | tee -a "$DIR/summary.txt"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$DIR/$name.log" 2>&1
    local rc=$?
    tail -n 15 "$DIR/$name.log"
    echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$DIR/summary.txt"
    [ $rc -eq 0 ] || FAILED=1
    return $rc
}

# --- packages ------------------------------------------------------------------------------------
{
    echo "date: $(date -u +%FT%TZ)"; echo "repo: $REPO ($(git rev-parse HEAD 2>/dev/null || echo 'no git'))"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv 2>&1
    "$PYTHON" -c 'import sys, torch, triton; print(sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.version.cuda, "triton", triton.__version__, "gpu", torch.cuda.is_available())' 2>&1
} > "$DIR/env.txt"
cat "$DIR/env.txt"
SITE="$DIR/site"
WHEELS=()
for whl in tools/wheels/*.whl; do
    [ -e "$whl" ] || continue
    dist="$(basename "$whl" | cut -d- -f1)"
    if ! "$PYTHON" -c 'import importlib.metadata as m, sys; m.version(sys.argv[1])' "$dist" 2>/dev/null; then
        WHEELS+=("$whl")
    fi
done
if [ ${#WHEELS[@]} -gt 0 ]; then
    step wheels 120 "$PYTHON" -m pip install --no-index --no-deps --no-compile --target "$SITE" "${WHEELS[@]}"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PYTHON" -c 'import dustin_kernels.templates' 2>/dev/null; then
    step install 180 "$PYTHON" -m pip install --no-index --no-deps --no-build-isolation -e "$REPO"
fi
"$PYTHON" -c 'import optuna' 2>/dev/null || echo "note: optuna is missing (add its wheels to tools/wheels): \
the tuner sweeps a random order of the candidates instead of TPE and keeps no journal" | tee -a "$DIR/summary.txt"

if ! "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    echo "gpu_check: no CUDA GPU visible to $PYTHON; nothing more to check here" | tee -a "$DIR/summary.txt"
    exit 2
fi

# --- tests: the GPU test tier ---------------------------------------------------------------------
step tests 240 env TRITON_INTERPRET=0 "$PYTHON" -m pytest -m gpu -p no:cacheprovider --junitxml "$DIR/tests.xml" tests

# --- generate: the generator end to end on this GPU (the demo pair: every policy, fidelity vs dense) ---
step generate 90 "$PYTHON" -m dustin_kernels.generate --demo --device cuda --fidelity

# --- tune: the headline shapes --------------------------------------------------------------------
# (a candidate hung in preparation costs at most 90 s; the seeds and final re-measures of 13 buckets
# run past the search budget: the step's limit leaves them 90 s)
step tune $((TUNE_SECONDS + 90)) "$PYTHON" -m dustin_kernels.autotune --grid headline --shape qwen2.5-72b \
    --batch 16 --context 8192 16384 32768 --budget 512 --time-budget "$TUNE_SECONDS" --jobs "$JOBS" \
    --prepare-timeout 90 --out "$DIR/perf_db" --log-dir "$DIR/autotune"

# --- bench: the same shapes, with the tuned configs ------------------------------------------
step bench 150 env DUSTIN_PERF_DB="$DIR/perf_db" "$PYTHON" tools/bench_kernels.py --preset qwen2.5-72b \
    --batch 16 --context 8192 16384 32768 --budget 512 --out "$DIR/bench"

# --- perf_check: what was just tuned ---------------------------------------------------------------
step perf_check 120 "$PYTHON" tools/perf_check.py --db "$DIR/perf_db" --gpu --jobs "$JOBS" --json "$DIR/perf_check.json"

# --- e2e: the retrieval testbed at the Qwen2.5-7B attention shape, compiled steps ---------------------
[ -d "$DIR/perf_db" ] && export DUSTIN_PERF_DB="$DIR/perf_db"
step e2e 360 "$PYTHON" tools/bench_e2e.py --device cuda --shape qwen2.5-7b --layers 12 --contexts 8192 16384 32768 \
    --draft-kv-heads 1 --batches 4 --budget 512 --new-tokens 32 --compile --out "$DIR/e2e"

echo "gpu_check: $([ $FAILED -eq 0 ] && echo OK || echo FAILED) in $((SECONDS - START)) s; results in $DIR" \
    | tee -a "$DIR/summary.txt"
exit $FAILED
