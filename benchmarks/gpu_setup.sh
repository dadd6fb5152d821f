# Sourced by the GPU session scripts (gpu_session.sh, gpu_recipe.sh), with OUT and WORK set:
# logs everything to $OUT/log.txt, installs the carried wheels (.whl/*.whl, unless NO_WHEELS is
# set) into $WORK/site, unpacks the carried CIFAR-10 copy (.gpudata/cifar10-jpeg.tar.gz) into
# $DATA, points cifarcam's caches and runs into $WORK, and defines elapsed/left (seconds since
# START, and what is left of BUDGET_S).
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
left() { echo $((BUDGET_S - $(elapsed))); }
