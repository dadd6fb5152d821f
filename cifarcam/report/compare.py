"""Several runs side by side: their curves on shared axes (a PNG), final metrics and config
differences, in an HTML page as self-contained as a run's report."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cifarcam.errors import UsageError
from cifarcam.report import figures, page
from cifarcam.runs.rundir import RunDir, enclosing_run, now_iso

# Fields of meta.json that tell runs apart besides their config.
_ENVIRONMENT = ("device", "device_name", "precision", "torch_version", "train_images", "test_images", "data")


@dataclass
class Comparison:
    names: list[str]
    generated: str
    curves: page.Picture
    finals: page.Table
    config_differences: page.Table
    same_config: page.Table


def _final_row(epochs: list[dict[str, Any]], meta: dict[str, Any], evaluation: dict[str, Any]) -> list[str]:
    last = epochs[-1]
    best = max(epochs, key=lambda record: record["test_acc"])
    return [
        page.fmt(meta.get("status", "unknown")),
        str(len(epochs)),
        page.fmt(last["train_loss"]),
        page.fmt(last["test_loss"]),
        page.percent(last["train_acc"]),
        page.percent(last["test_acc"]),
        f"{best['test_acc']:.2%} (epoch {best['epoch']})",
        page.percent(evaluation.get("accuracy")),
        page.percent(evaluation.get("accuracy_tta")),
        f"{page.mean_epoch_time(epochs):.1f} s",
        page.wall_time(meta),
    ]


def _differences(values: list[dict[str, Any]], names: list[str]) -> tuple[page.Table, page.Table]:
    """The keys whose values differ between runs, and those that are the same in all of them."""
    keys = dict.fromkeys(key for flat in values for key in flat)
    differ, same = [], []
    for key in keys:
        cells = [json.dumps(flat.get(key, "(absent)"), sort_keys=True) for flat in values]
        if len(set(cells)) > 1:
            differ.append([key, *[page.fmt(flat[key]) if key in flat else "(absent)" for flat in values]])
        else:
            same.append([key, page.fmt(values[0].get(key))])
    return page.Table(["setting", *names], differ), page.Table(["setting", "value in every run"], same)


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
    metas = [page.read_optional(run, run.meta_path) or {} for run in runs]
    evaluations = [page.read_optional(run, run.evaluation_path) or {} for run in runs]
    configs = [page.flatten(page.read_optional(run, run.config_path) or {}) for run in runs]
    for flat, meta in zip(configs, metas, strict=True):
        flat |= {f"meta.{key}": meta[key] for key in _ENVIRONMENT if key in meta}
    png = figures.compare_curves(epochs)
    differ, same = _differences(configs, names)
    columns = ["run", "status", "epochs", "train loss", "test loss", "train acc", "test acc", "best test acc"]
    columns += ["evaluate acc", "with TTA", "time per epoch", "wall time"]
    comparison = Comparison(
        names=names,
        generated=now_iso(),
        curves=page.Picture("Test (solid) and train (dashed) curves per epoch", page.data_uri(png)),
        finals=page.Table(
            columns,
            [
                [name, *_final_row(epochs[name], meta, evaluation)]
                for name, meta, evaluation in zip(names, metas, evaluations, strict=True)
            ],
        ),
        config_differences=differ,
        same_config=same,
    )
    html = page.render("compare.html.j2", comparison=comparison)
    html_path, png_path = page.write_outputs({out: html, out.with_suffix(".png"): png})
    return html_path, png_path
