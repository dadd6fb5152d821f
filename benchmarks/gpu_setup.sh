# Sourced by benchmarks/gpu_recipe.sh, with OUT and WORK set:
# logs everything to $OUT/log.txt, installs the carried wheels (.whl/*.whl, unless NO_WHEELS is
# set) into $WORK/site, unpacks the carried CIFAR-10 copy (.gpudata/cifar10-jpeg.tar.gz) into
# $DATA, points cifarcam's caches and runs into $WORK, defines elapsed/left (seconds since
# START, and what is left of BUDGET_S) and `common` (the options of every training run, from
# DATA, DEVICE, EPOCHS and the optional SUBSET and WIDTH) and pack (every run's files so far,
# less checkpoints, locks and any further --exclude given, into $OUT/runs.tar.gz, replaced
# atomically so a killed script keeps the last), and prints the machine's GPU.
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1 COLUMNS=100

if [ -z "${NO_WHEELS:-}" ] && compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$WORK/site" .whl/*.whl || exit 1
    export PYTHONPATH="$WORK/site:$PWD"
else
    export PYTHONPATH="$PWD"
fi
DATA=$WORK/cifar
if [ ! -d "$DATA/train" ]; then
    mkdir -p "$DATA" && tar -xzf .gpudata/cifar10-jpeg.tar.gz -C "$DATA" || exit 1
fi
export CIFARCAM_DATA_DIR=$WORK/cache CIFARCAM_RUNS_DIR=$WORK/runs

elapsed() { echo $(($(date +%s) - START)); }
pack() {
    (cd "$WORK/runs" && tar -czf "$OUT/.runs.tmp" --exclude='*.safetensors' --exclude='*.lock' "$@" .) &&
        mv "$OUT/.runs.tmp" "$OUT/runs.tar.gz"
}
left() { echo $((BUDGET_S - $(elapsed))); }

size=()
[ -n "${SUBSET:-}" ] && size+=(--subset "$SUBSET")
[ -n "${WIDTH:-}" ] && size+=(--width "$WIDTH")
common=(--data "$DATA" --device "$DEVICE" --epochs "$EPOCHS" "${size[@]}")

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
python3 -c "import sys, torch, torchvision; print(sys.version.split()[0], torch.__version__, torchvision.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"
