#!/usr/bin/env bash
# Set up .venv from nothing, then run the whole chain on one run directory:
# train -> evaluate -> misclassified -> gradcam -> sanity -> plot -> report.
# On a GPU it trains the full 20-epoch ResNet18; without one it uses --preset quick.
# Environment: DATA (cifar10, or the path of an image-folder copy), RUN (run name, default r1).
# Extra arguments go to `cifarcam train` (e.g. --overwrite).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e .
data="${DATA:-cifar10}"
run="${RUN:-r1}"
preset=()
if ! .venv/bin/python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "No CUDA GPU found: training with --preset quick (CPU-sized; see README)."
  preset=(--preset quick)
fi
.venv/bin/cifarcam train --run "$run" --data "$data" "${preset[@]}" "$@"
.venv/bin/cifarcam evaluate --run "$run"
.venv/bin/cifarcam misclassified --run "$run" --count 10
.venv/bin/cifarcam gradcam --run "$run" --layer layer3 --layer layer4 --metrics
.venv/bin/cifarcam sanity --run "$run" --layer layer4
.venv/bin/cifarcam plot --run "$run"
.venv/bin/cifarcam report --run "$run"
echo "Done: open runs/$run/report.html (or see plots/, misclassified.png, gradcam/, sanity/)"
