"""Several runs side by side: their curves on shared axes (a PNG), final metrics and config differences.

The HTML page embeds the PNG and is self-contained like a run's report.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cifarcam.errors import UsageError
from cifarcam.report import figures
from cifarcam.report.page import (
    Picture,
    Table,
    as_dict,
    data_uri,
    duration,
    epoch_times,
    flatten,
    fmt,
    minutes,
    percent,
    read_optional,
    render,
    write_outputs,
)
from cifarcam.runs.rundir import RunDir, enclosing_run, now_iso

# Fields of meta.json that tell runs apart besides their config.
_ENVIRONMENT = ("device", "device_name", "precision", "torch_version", "train_images", "test_images", "data")


@dataclass
class Comparison:
    names: list[str]
    generated: str
    curves: Picture
    finals: Table
    config_differences: Table
    same_config: Table


def _final_row(epochs: list[dict[str, Any]], meta: dict[str, Any], evaluation: dict[str, Any]) -> list[str]:
    last = epochs[-1]
    accuracies = [(e["test_acc"], e.get("epoch")) for e in epochs if isinstance(e.get("test_acc"), float)]
    best = max(accuracies, key=lambda pair: pair[0], default=None)
    times = epoch_times(epochs)
    return [
        fmt(meta.get("status", "unknown")),
        str(len(epochs)),
        fmt(last.get("train_loss")),
        fmt(last.get("test_loss")),
        percent(last.get("train_acc")),
        percent(last.get("test_acc")),
        f"{best[0]:.2%} (epoch {fmt(best[1])})" if best else "-",
        percent(evaluation.get("accuracy")),
        percent(evaluation.get("accuracy_tta")),
        f"{statistics.mean(times):.1f} s" if times else "-",
        minutes(duration(meta)),
    ]


def _differences(values: list[dict[str, Any]], names: list[str]) -> tuple[Table, Table]:
    """The keys whose values differ between runs, and those that are the same in all of them."""
    keys: list[str] = []
    for flat in values:
        keys += [key for key in flat if key not in keys]
    differ, same = [], []
    for key in keys:
        cells = [json.dumps(flat.get(key, "(absent)"), sort_keys=True) for flat in values]
        if len(set(cells)) > 1:
            differ.append([key, *[fmt(flat[key]) if key in flat else "(absent)" for flat in values]])
        else:
            same.append([key, fmt(values[0].get(key))])
    return Table(["setting", *names], differ), Table(["setting", "value in every run"], same)


def compare(runs: list[RunDir], out: Path) -> tuple[Path, Path]:
    """Write out (HTML) and out with a .png suffix (the curves); return both paths."""
    names = [run.name for run in runs]
    if len(runs) < 2:
        raise UsageError(f"compare needs at least 2 runs (got {len(runs)})")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise UsageError(f"run '{repeated[0]}' is given more than once")
    if out.suffix != ".html":
        raise UsageError(f"--out must name an .html file (got '{out}'); the PNG is written next to it")
    inside = enclosing_run(out)
    if inside is not None:
        raise UsageError(
            f"--out '{out}' is inside run '{inside.name}'; compare never writes into a run",
            hint="name a file outside the runs, e.g. runs/compare.html (the default)",
        )
    epochs = {run.name: run.read_epochs() for run in runs}
    metas = [as_dict(read_optional(run, run.meta_path)) for run in runs]
    evaluations = [as_dict(read_optional(run, run.evaluation_path)) for run in runs]
    configs = [flatten(as_dict(read_optional(run, run.config_path))) for run in runs]
    for flat, meta in zip(configs, metas, strict=True):
        flat |= {f"meta.{key}": meta[key] for key in _ENVIRONMENT if key in meta}
    png = figures.compare_curves(epochs)
    differ, same = _differences(configs, names)
    columns = ["run", "status", "epochs", "train loss", "test loss", "train acc", "test acc", "best test acc"]
    columns += ["evaluate acc", "with TTA", "time per epoch", "wall time"]
    comparison = Comparison(
        names=names,
        generated=now_iso(),
        curves=Picture("Test (solid) and train (dashed) curves per epoch", data_uri(png)),
        finals=Table(
            columns,
            [
                [name, *_final_row(epochs[name], meta, evaluation)]
                for name, meta, evaluation in zip(names, metas, evaluations, strict=True)
            ],
        ),
        config_differences=differ,
        same_config=same,
    )
    html = render("compare.html.j2", comparison=comparison)
    html_path, png_path = write_outputs({out: html, out.with_suffix(".png"): png})
    return html_path, png_path
