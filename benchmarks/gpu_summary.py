"""One table of the runs under a runs directory (benchmarks/gpu_recipe.sh prints it last).

For each run: the options that differ from the defaults, final test accuracy, `evaluate`'s
accuracy with TTA (where it ran), training seconds (the sum of metrics.json's epoch_time_s:
training steps only), the first epoch's seconds and the rest. Writes runs.json beside.
Usage: python benchmarks/gpu_summary.py RUNS_DIR [OUT_JSON]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from cifarcam.config import TrainConfig


def differences(config: dict[str, Any]) -> str:
    defaults = TrainConfig().model_dump()
    skip = {"data", "data_dir", "device"}
    changed = [
        f"{key}={value}" for key, value in config.items() if key not in skip and defaults.get(key) != value
    ]
    return " ".join(changed) or "(defaults)"


def summary(run: Path) -> dict[str, Any] | None:
    try:
        epochs = json.loads((run / "metrics.json").read_text())["epochs"]
        config = json.loads((run / "config.json").read_text())
    except (OSError, ValueError, KeyError):
        return None
    times = [epoch["epoch_time_s"] for epoch in epochs]
    row: dict[str, Any] = {
        "options": differences(config),
        "epochs": len(epochs),
        "test_acc": epochs[-1]["test_acc"],
        "train_acc": epochs[-1]["train_acc"],
        "train_s": round(sum(times), 1),
        "first_epoch_s": round(times[0], 2),
        "later_epochs_s": round(sum(times[1:]), 1),
    }
    evaluation = run / "evaluation.json"
    if evaluation.exists():
        row["test_acc_tta"] = json.loads(evaluation.read_text()).get("accuracy_tta")
    return row


def main() -> None:
    runs = Path(sys.argv[1])
    rows = {run.name: row for run in sorted(runs.iterdir()) if (row := summary(run)) is not None}
    if len(sys.argv) > 2:
        Path(sys.argv[2]).write_text(json.dumps(rows, indent=1) + "\n")
    header = ("test", "TTA", "train", "train s", "1st ep", "rest")
    print(f"{'run':14s}", *(f"{name:>7s}" for name in header), " options")
    for name, row in rows.items():
        tta = row.get("test_acc_tta")
        print(
            f"{name:14s} {row['test_acc']:7.2%} {f'{tta:.2%}' if tta else '-':>7s} {row['train_acc']:7.1%} "
            f"{row['train_s']:7.1f} {row['first_epoch_s']:7.2f} {row['later_epochs_s']:7.1f}",
            row["options"],
        )


if __name__ == "__main__":
    main()
