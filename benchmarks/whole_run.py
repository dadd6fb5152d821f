"""Time the whole chain as a user runs it: train, evaluate, misclassified, gradcam, plot.

Each step is a separate `python -m cifarcam` process, so start-up and data loading count.
Usage: python benchmarks/whole_run.py --data PATH [--runs-dir DIR] [-- TRAIN OPTIONS...]
(default train options: --preset quick). Prints each step's seconds, the total and the
accuracies, which go into docs/performance.md with the hardware.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def step(name: str, args: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cifarcam", *args], check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    print(f"{name:<14}{seconds:8.1f} s", flush=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, help="cifar10 or an image-folder tree")
    parser.add_argument("--runs-dir", type=Path, default=None)
    parser.add_argument("--run", default="bench")
    parser.add_argument("train_options", nargs="*", default=["--preset", "quick"])
    args = parser.parse_args()
    runs_dir = args.runs_dir or Path(tempfile.mkdtemp(prefix="cifarcam-bench-"))
    common = ["--run", args.run, "--runs-dir", str(runs_dir)]

    from workload import machine

    print(f"{machine()}, data {args.data}, train options {' '.join(args.train_options)}")
    total = step("train", ["train", *common, "--data", args.data, "--overwrite", *args.train_options])
    total += step("evaluate", ["evaluate", *common])
    total += step("misclassified", ["misclassified", *common])
    total += step("gradcam", ["gradcam", *common, "--layer", "layer4"])
    total += step("plot", ["plot", *common])
    run = runs_dir / args.run
    evaluation = json.loads((run / "evaluation.json").read_text())
    epochs = json.loads((run / "metrics.json").read_text())["epochs"]
    print(f"total         {total:8.1f} s ({total / 60:.2f} min)")
    print(
        f"epochs {len(epochs)}, training {sum(e['epoch_time_s'] for e in epochs):.1f} s, "
        f"per-epoch test evaluation {sum(e['eval_time_s'] for e in epochs):.1f} s"
    )
    tta = evaluation.get("accuracy_tta", float("nan"))
    print(f"test accuracy {evaluation['accuracy']:.4f}, with TTA {tta:.4f}")
    print(f"run directory: {run}")


if __name__ == "__main__":
    main()
