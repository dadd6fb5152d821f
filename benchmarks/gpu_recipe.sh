#!/usr/bin/env bash
# The sixth session's prepared GPU check (issue 4), run once on a lent CUDA machine with no
# internet. Expects .gpudata/cifar10-jpeg.tar.gz and, optionally, .whl/*.whl (what the machine
# lacks); writes log.txt, step.txt (benchmarks/gpu_step.py), runs.json and runs.tar.gz (every
# run's JSON files) into $OUT.
#
# 1. benchmarks/gpu_step.py: where a training step's time goes, eager against CUDA graphs.
# 2. The default recipe eagerly (--no-cuda-graphs), then as it is (CUDA graphs), one at a time
#    (timed), each evaluated.
# 3. Recipe variants, PARALLEL at a time on the one GPU (their times are not comparable; their
#    accuracies are), each evaluated; eager if step 2's graphed run failed.
# 4. benchmarks/gpu_summary.py's table of every run.
# CPU dry run: NO_WHEELS=1 EPOCHS=1 SUBSET=1000 WIDTH=8 DEVICE=cpu STEP_ARGS="--device cpu --width 8 --steps 2 --batch-sizes 64 --profile-batch 64 --rounds 1" bash benchmarks/gpu_recipe.sh
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

pack() {
    (cd "$WORK/runs" && tar -czf "$OUT/.runs.tmp" --exclude='*.safetensors' --exclude='*.lock' --exclude='*.png' .) &&
        mv "$OUT/.runs.tmp" "$OUT/runs.tar.gz"
    python3 benchmarks/gpu_summary.py "$WORK/runs" "$OUT/runs.json" >"$OUT/summary.txt"
}

# 1. The step's time, eager against graphed.
echo "=== [$(elapsed) s] gpu_step.py"
# shellcheck disable=SC2086  # STEP_ARGS is a list of options
timeout 150 python3 benchmarks/gpu_step.py ${STEP_ARGS:-} >"$OUT/step.txt" 2>&1
echo "=== rc=$? after $(elapsed) s"
grep -v "^ *$" "$OUT/step.txt" | grep -v "^-\|aten::\|Name  \|void \|USDT\|Self CPU" | tail -12

# The CUDA-graph tests (skipped on a CPU-only machine).
python3 -m pytest -q -p no:cacheprovider tests/test_graphs.py 2>&1 | grep -E "^E |FAILED|passed|failed" | head -20

# 2. The default recipe, eager and graphed, one at a time, each evaluated.
one() {  # name, options...: train then evaluate, output to logs/name.txt; prints one line
    local name=$1 t0
    shift
    t0=$(date +%s%N)
    {
        timeout $(($(left) + 30)) python3 -m cifarcam train --run "$name" "${common[@]}" "$@" &&
            python3 -m cifarcam evaluate --run "$name"
    } >"$WORK/logs/$name.txt" 2>&1
    local rc=$?
    echo "=== [$(elapsed) s] $name rc=$rc in $((($(date +%s%N) - t0) / 1000000)) ms: $*"
    [ $rc -eq 0 ] || tail -5 "$WORK/logs/$name.txt"
    return $rc
}
one eager --no-cuda-graphs
graphs=()
one default || graphs=(--no-cuda-graphs)  # the default replays CUDA graphs; eager if that failed
pack

# 3. Variants, PARALLEL at a time, while time is left.
cfg() { echo "$2" >"$WORK/configs/$1.json"; echo "$WORK/configs/$1.json"; }
VARIANTS=(
    "ema99|--ema-decay 0.99"
    "lr08|--lr 0.8"
    "nobndecay|--config $(cfg nobndecay '{"decay_norm_and_bias": false}')"
    "bs1024|--batch-size 1024 --lr 0.8"
    "ema995|--ema-decay 0.995"
    "wd1e3|--config $(cfg wd1e3 '{"weight_decay": 0.001}')"
    "ls02|--label-smoothing 0.2"
    "lr02|--lr 0.2"
    "bs256|--batch-size 256 --lr 0.4"
    "warm01|--config $(cfg warm01 '{"warmup": 0.1}')"
    "cut8|--config $(cfg cut8 '{"augment": {"flip": true, "translate": 4, "cutout": 8}}')"
    "seed1|--seed 1"
)
# Several torch processes, each with a thread per core, can stall one another: share the cores.
export OMP_NUM_THREADS=$(($(nproc) / PARALLEL > 0 ? $(nproc) / PARALLEL : 1))
pids=()  # (a bare `wait` would also wait for the tee above, forever)
for spec in "${VARIANTS[@]:0:${MAX_VARIANTS:-99}}"; do
    while [ "$(jobs -rp | wc -l)" -ge "$PARALLEL" ]; do wait -n $(jobs -rp); done
    [ "$(left)" -gt 60 ] || { echo "=== skipped ${spec%%|*}: $(left) s left"; continue; }
    # shellcheck disable=SC2086  # the options are split on spaces
    one "${spec%%|*}" ${spec#*|} "${graphs[@]}" &
    pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
pack
echo "=== done after $(elapsed) s"
cat "$OUT/summary.txt"
