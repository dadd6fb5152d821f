#!/usr/bin/env bash
# The prepared GPU check of the 20-epoch recipe (issue 4), run once on a lent CUDA machine with
# no internet. It expects, relative to the repository root:
#   .gpudata/cifar10-jpeg.tar.gz  the shared CIFAR-10 copy (the machine cannot download)
#   .whl/*.whl                    wheels of what the machine lacks (pydantic, typer, ...), optional
# and writes into $OUT: log.txt, runs.tar.gz (every run's JSON and PNG files, no checkpoints) and
# the default run's final model split into 15 MB parts (last.safetensors.part-*).
#
# Order: a 1-epoch smoke test (stops the script at once if the CUDA path is broken), the default
# recipe with the whole chain (evaluate, misclassified, gradcam, plot, report), then the same
# recipe compiled, then recipe variants while time is left (BUDGET_S seconds from the start).
# For a CPU dry run of the flow: NO_WHEELS=1 EPOCHS=1 SUBSET=2000 WIDTH=8 DEVICE=cpu bash benchmarks/gpu_session.sh
set -u
START=$(date +%s)
BUDGET_S=${BUDGET_S:-520}
EPOCHS=${EPOCHS:-20}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-/tmp/gpu-session-out}
WORK=${WORK:-/tmp/gpu-session}
# shellcheck source=benchmarks/gpu_setup.sh
source benchmarks/gpu_setup.sh
cc() {  # one cifarcam command, timed
    local t0=$(date +%s%N)
    echo "=== [$(elapsed) s] cifarcam $*"
    python3 -m cifarcam "$@"
    local rc=$?
    echo "=== rc=$rc in $((($(date +%s%N) - t0) / 1000000)) ms: cifarcam $1 $3"
    return $rc
}

chain() {  # the commands a user runs after training
    cc evaluate --run "$1"
    cc misclassified --run "$1" --count 10
    cc gradcam --run "$1" --layer layer4 --layer layer3 --method gradcam --method gradcam++ --method scorecam
    cc gradcam --run "$1" --layer layer4 --all
    cc plot --run "$1"
    cc report --run "$1"
}

if [ -n "${SKIP_BASE:-}" ]; then  # only the VARIANTS ("name options;name options")
    need=${NEED_S:-55}
    step=variants
else
    step=base
fi

if [ "$step" = base ]; then
# 1. Smoke: one short epoch and the commands that read the run; stop at once if any fails.
cc train --run smoke --data "$DATA" --device "$DEVICE" --epochs 1 --subset 2000 --width 16 &&
    cc evaluate --run smoke && cc gradcam --run smoke --layer layer4 || { echo "SMOKE FAILED"; exit 1; }

# 2. The default recipe (what `cifarcam train --run R` does), eager, and its whole chain.
t0=$(elapsed)
cc train --run default "${common[@]}"
need=$(($(elapsed) - t0 + 20))  # what one more training run and its evaluation take, with margin
chain default
pack
mkdir -p "$OUT/model"
[ -f "$WORK/runs/default/checkpoints/last.safetensors" ] &&
    split -b 15M -d "$WORK/runs/default/checkpoints/last.safetensors" "$OUT/model/last.safetensors.part-"

# 3. The same recipe under torch.compile.
[ "$(left)" -gt $((need + 60)) ] && timeout $(($(left) - 10)) python3 -m cifarcam train --run compiled "${common[@]}" --compile
cc evaluate --run compiled
pack
fi

# 4. Variants, one change each, while time is left.
echo '{"augment": {"flip": true, "translate": 4, "cutout": 8}}' >"$WORK/cutout8.json"
variant() {
    local name=$1
    shift
    [ "$(left)" -gt "$need" ] || { echo "=== skipped $name: $(left) s left"; return; }
    echo "=== [$(elapsed) s] variant $name: $*"
    timeout $(($(left) - 10)) python3 -m cifarcam train --run "$name" "${common[@]}" "$@"
    cc evaluate --run "$name"
    pack
}
VARIANTS=${VARIANTS:-"seed1 --seed 1;cutout8 --config $WORK/cutout8.json;bs256 --batch-size 256 --lr 0.2;lr08 --lr 0.8"}
IFS=';' read -ra specs <<<"$VARIANTS"
for spec in "${specs[@]}"; do
    # shellcheck disable=SC2086  # a spec is a run name and its options, split on spaces
    variant $spec
done

echo "=== done after $(elapsed) s"
ls -la "$OUT"
