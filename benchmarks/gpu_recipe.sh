#!/usr/bin/env bash
# The GPU check of the 20-epoch recipe, for a CUDA machine with no internet. Expects
# .gpudata/cifar10-jpeg.tar.gz, optionally .whl/*.whl (what the machine lacks) and
# .baseline/cifarcam (another commit's package, `git archive REV cifarcam | tar -x -C .baseline`,
# to time against on the same machine); writes log.txt, warmup.txt (benchmarks/gpu_warmup.py),
# runs.json and runs.tar.gz (every run's JSON files) into $OUT.
#
# 1. benchmarks/gpu_warmup.py: what the first steps cost beyond the steady one, cuDNN's
#    benchmark mode on and off. Then the CUDA-graph tests.
# 2. Timed whole runs (TIMED), one at a time, each evaluated. By default: the defaults; the
#    baseline package's defaults (when carried); cudnn_benchmark off; the defaults again; then,
#    while BUDGET_S allows, the baseline and cudnn_benchmark off again. Other runs, for example:
#    TIMED="f16a|--precision fp16;bf16|;f16b|--precision fp16 --seed 1"
# 3. Recipe variants, PARALLEL at a time on the one GPU (their times are not comparable; their
#    accuracies are), each evaluated, while time is left.
# 4. benchmarks/gpu_summary.py's table of every run.
# Options: BENCH=0 skips gpu_warmup.py, TESTS=0 the CUDA-graph tests; CHAIN=1 times the commands
# after training on the first timed run; VARIANT_SPECS="name|options;..." replaces the variants.
# CPU dry run: NO_WHEELS=1 EPOCHS=1 SUBSET=1000 WIDTH=8 DEVICE=cpu MAX_VARIANTS=2 WARMUP_ARGS="--device cpu --width 4 --batch-size 16 --short 12 --steps 2" bash benchmarks/gpu_recipe.sh
set -u
START=$(date +%s)
BUDGET_S=${BUDGET_S:-420}
EPOCHS=${EPOCHS:-20}
DEVICE=${DEVICE:-cuda}
PARALLEL=${PARALLEL:-4}
OUT=${OUT:-/tmp/gpu-recipe-out}
WORK=${WORK:-/tmp/gpu-recipe}
# shellcheck source=benchmarks/gpu_setup.sh
source benchmarks/gpu_setup.sh
mkdir -p "$WORK/logs" "$WORK/configs"

pack_json() {  # the runs' JSON files (no PNGs) and the summary table
    pack --exclude='*.png'
    python3 benchmarks/gpu_summary.py "$WORK/runs" "$OUT/runs.json" >"$OUT/summary.txt"
}

# 1. The first steps' cost, cuDNN benchmark mode on and off (BENCH=0: skip this and the tests).
if [ "${BENCH:-1}" != 0 ]; then
    echo "=== [$(elapsed) s] gpu_warmup.py"
    # shellcheck disable=SC2086  # WARMUP_ARGS is a list of options
    timeout 150 python3 benchmarks/gpu_warmup.py ${WARMUP_ARGS:-} >"$OUT/warmup.txt" 2>&1
    echo "=== rc=$? after $(elapsed) s"
    tail -14 "$OUT/warmup.txt"
fi
# The CUDA-graph tests (skipped on a CPU-only machine; TESTS=0: not run).
if [ "${TESTS:-1}" != 0 ]; then
    python3 -m pytest -q -p no:cacheprovider tests/test_graphs.py 2>&1 | grep -E "^E |FAILED|passed|failed" | head -20
    echo "=== tests done after $(elapsed) s"
fi

# 2. Timed whole runs, one at a time, each evaluated.
one() {  # name, options...: train then evaluate, output to logs/name.txt; prints one line
    local name=$1 t0
    shift
    t0=$(date +%s%N)
    {
        timeout $(($(left) + 30)) "${cli[@]}" train --run "$name" "${common[@]}" "$@" &&
            "${cli[@]}" evaluate --run "$name"
    } >"$WORK/logs/$name.txt" 2>&1
    local rc=$?
    echo "=== [$(elapsed) s] $name rc=$rc in $((($(date +%s%N) - t0) / 1000000)) ms: ${cli[*]:0:2} $*"
    [ $rc -eq 0 ] || tail -5 "$WORK/logs/$name.txt"
    return $rc
}
cfg() { echo "$2" >"$WORK/configs/$1.json"; echo "$WORK/configs/$1.json"; }
cli=(python3 -m cifarcam)
# The baseline package: -P keeps the working tree's cifarcam off the path.
baseline=(env "PYTHONPATH=$PWD/.baseline:$WORK/site" python3 -P -m cifarcam)
off=$(cfg cudnn_off '{"cudnn_benchmark": false}')
base() {
    [ -d .baseline/cifarcam ] || return 0
    local cli=("${baseline[@]}")  # seen by `one`
    one "$@"
}
# name|options, ';' between runs; BASE: the baseline package's defaults; OFF: cudnn_benchmark off.
TIMED=${TIMED:-"new1|;base1|BASE;off1|--config OFF;new2|;base2|BASE;off2|--config OFF"}
IFS=';' read -ra timed <<<"$TIMED"
for index in "${!timed[@]}"; do
    spec=${timed[$index]}
    name=${spec%%|*} options=${spec#*|}
    [ "$index" -lt 4 ] || [ "$(left)" -gt 110 ] || { echo "=== skipped $name: $(left) s left"; continue; }
    if [ "$options" = BASE ]; then
        base "$name"
    else
        # shellcheck disable=SC2086  # the options are split on spaces
        one "$name" ${options//OFF/$off}
    fi
done
pack_json

# 2b. CHAIN=1: the commands a user runs after training, each timed, on the first timed run.
if [ "${CHAIN:-0}" = 1 ]; then
    first=${timed[0]%%|*}
    for args in "misclassified --count 10" "gradcam --layer layer4 --layer layer3 --method gradcam --method gradcam++" \
        "gradcam --layer layer4 --all" "sanity --layer layer4" "plot" "report"; do
        read -ra words <<<"$args"
        t0=$(date +%s%N)
        "${cli[@]}" "${words[0]}" --run "$first" "${words[@]:1}" >>"$WORK/logs/chain.txt" 2>&1
        echo "=== [$(elapsed) s] chain rc=$? in $((($(date +%s%N) - t0) / 1000000)) ms: $args"
    done
    tail -3 "$WORK/logs/chain.txt"
    pack
fi

# 3. Variants, PARALLEL at a time, while time is left.
VARIANTS=(
    "t3|--config $(cfg t3 '{"augment": {"flip": true, "translate": 3, "cutout": 0}}')"
    "ls0|--label-smoothing 0"
    "wd25|--config $(cfg wd25 '{"weight_decay": 0.00025}')"
    "lr03|--lr 0.3"
)
# VARIANT_SPECS replaces that list: "name|options;name|options" (a later --epochs wins).
[ -n "${VARIANT_SPECS:-}" ] && IFS=';' read -ra VARIANTS <<<"$VARIANT_SPECS"
# Several torch processes, each with a thread per core, can stall one another: share the cores.
export OMP_NUM_THREADS=$(($(nproc) / PARALLEL > 0 ? $(nproc) / PARALLEL : 1))
pids=()  # (a bare `wait` would also wait for the tee above, forever)
for spec in "${VARIANTS[@]:0:${MAX_VARIANTS:-99}}"; do
    while [ "$(jobs -rp | wc -l)" -ge "$PARALLEL" ]; do wait -n $(jobs -rp); done
    [ "$(left)" -gt 60 ] || { echo "=== skipped ${spec%%|*}: $(left) s left"; continue; }
    # shellcheck disable=SC2086  # the options are split on spaces
    one "${spec%%|*}" ${spec#*|} &
    pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
pack_json
echo "=== done after $(elapsed) s"
cat "$OUT/summary.txt"
