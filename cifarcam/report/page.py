"""A run's report: gather its files into plain values, render them into one self-contained HTML page.

The page embeds every image as a data: URI and forbids any request through its
Content-Security-Policy, so it opens offline and cannot fetch anything. Values are autoescaped.
Files written by other commands are read generically: unknown keys are shown, missing ones skipped.
"""

from __future__ import annotations

import base64
import json
import statistics
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2

import cifarcam
from cifarcam.errors import RunError
from cifarcam.report import figures
from cifarcam.runs.files import atomic_write_files, written_file
from cifarcam.runs.rundir import RunDir, now_iso, reads_run

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
SECTIONS = {
    "run": "The run",
    "curves": "Curves",
    "evaluation": "Evaluation",
    "misclassified": "Misclassified test images",
    "gradcam": "Grad-CAM",
    "faithfulness": "Faithfulness",
    "sanity": "Sanity checks",
}
_TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
# Keys of a gallery's JSON that describe it as a whole (the rest are per-image lists).
_GALLERY_LIST_KEYS = ("methods", "layers", "targets")


@dataclass
class Picture:
    title: str
    uri: str
    facts: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Table:
    columns: list[str]
    rows: list[list[str]]


@dataclass
class SanityCheck:
    title: str
    picture: Picture | None
    steps: Table | None
    facts: list[tuple[str, str]]


@dataclass
class RunReport:
    """Everything the report page shows; None (or empty) means the producing command has not run."""

    name: str
    generated: str
    status: str
    overview: list[tuple[str, str]]
    config: list[tuple[str, str]]
    curves: Picture
    epochs: Table
    hints: dict[str, str]
    evaluation: list[tuple[str, str]] | None = None
    per_class: list[tuple[str, float]] | None = None
    confusion: Picture | None = None
    misclassified: Picture | None = None
    mistakes: Table | None = None
    gradcam: list[Picture] = field(default_factory=list)
    faithfulness: Table | None = None
    faithfulness_facts: list[tuple[str, str]] = field(default_factory=list)
    sanity: list[SanityCheck] = field(default_factory=list)


def fmt(value: Any) -> str:
    """A value as table text: floats to 4 significant digits, lists joined, None as a dash."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | tuple):
        return ", ".join(fmt(item) for item in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def percent(value: Any) -> str:
    return f"{value:.2%}" if isinstance(value, int | float) else "-"


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'augment': {'flip': True}} -> {'augment.flip': True}."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def picture_file(path: Path, title: str, facts: list[tuple[str, str]] | None = None) -> Picture:
    return Picture(title, data_uri(path.read_bytes()), facts or [])


def table_of(records: list[Any]) -> Table | None:
    """Rows of dicts as a table whose columns are all their keys, in order of first appearance."""
    rows = [record for record in records if isinstance(record, dict)]
    columns: list[str] = []
    for record in rows:
        columns += [key for key in record if key not in columns]
    if not columns:
        return None
    return Table(columns, [[fmt(record.get(column)) for column in columns] for record in rows])


def scalar_facts(mapping: dict[str, Any], skip: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """The short scalar entries of a JSON object, plus its 'methods'/'layers' lists."""
    facts = []
    for key, value in mapping.items():
        if key in skip:
            continue
        short_scalar = isinstance(value, str | int | float | bool) and len(str(value)) <= 120
        if short_scalar or (key in _GALLERY_LIST_KEYS and isinstance(value, list)):
            facts.append((key, fmt(value)))
    return facts


def describe(mapping: dict[str, Any], fallback: str) -> str:
    """'gradcam at layer4' from a JSON's title, method(s) and layer(s); the file's stem otherwise."""
    if isinstance(mapping.get("title"), str):
        return str(mapping["title"])
    method = mapping.get("method") or mapping.get("methods")
    layer = mapping.get("layer") or mapping.get("layers")
    if method and layer:
        return f"{fmt(method)} at {fmt(layer)}"
    return fmt(method or layer or fallback)


def read_optional(run: RunDir, path: Path) -> Any:
    """A JSON file's value, or None when it does not exist (a corrupt file is an error)."""
    return run.read_json(path) if path.exists() else None


def as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def duration(meta: dict[str, Any]) -> float | None:
    try:
        start = datetime.fromisoformat(meta["started_at"])
        return (datetime.fromisoformat(meta["ended_at"]) - start).total_seconds()
    except (KeyError, TypeError, ValueError):
        return None


def minutes(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds / 60:.1f} min ({seconds:.0f} s)"


def epoch_times(epochs: list[dict[str, Any]]) -> list[float]:
    return [float(e["epoch_time_s"]) for e in epochs if isinstance(e.get("epoch_time_s"), int | float)]


def _overview(meta: dict[str, Any], epochs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    times = epoch_times(epochs)
    rows = [
        ("status", fmt(meta.get("status", "unknown"))),
        ("started / ended", f"{fmt(meta.get('started_at'))} / {fmt(meta.get('ended_at'))}"),
        ("wall time", minutes(duration(meta))),
        ("epochs completed", str(len(epochs))),
        ("time per epoch", f"{statistics.mean(times):.1f} s (mean of {len(times)})" if times else "-"),
        ("device", " ".join(fmt(meta[k]) for k in ("device", "device_name") if k in meta) or "-"),
        ("precision", fmt(meta.get("precision"))),
        ("data", fmt(meta.get("data"))),
        (
            "images (train / validation / test)",
            " / ".join(fmt(meta.get(k)) for k in ("train_images", "val_images", "test_images")),
        ),
        ("classes", fmt(meta.get("classes"))),
        (
            "versions",
            ", ".join(
                f"{name} {meta[f'{name}_version']}"
                for name in ("cifarcam", "torch", "python")
                if f"{name}_version" in meta
            )
            or "-",
        ),
        ("command", fmt(meta.get("command"))),
    ]
    if meta.get("error"):
        rows.insert(1, ("error", fmt(meta["error"])))
    return rows


def _epochs_table(epochs: list[dict[str, Any]]) -> Table:
    table = table_of(epochs)
    assert table is not None  # RunDir.read_epochs keeps only dicts
    for row in table.rows:
        for index, column in enumerate(table.columns):
            value = row[index]
            if column.endswith("_acc") and value != "-":
                row[index] = f"{float(value):.2%}"
    return table


def _add_evaluation(report: RunReport, evaluation: dict[str, Any], meta: dict[str, Any]) -> None:
    report.evaluation = [
        ("accuracy", percent(evaluation.get("accuracy"))),
        ("accuracy with test-time augmentation", percent(evaluation.get("accuracy_tta"))),
        ("mean loss / with TTA", f"{fmt(evaluation.get('loss'))} / {fmt(evaluation.get('loss_tta'))}"),
        ("test images", fmt(evaluation.get("num_images"))),
        ("checkpoint", f"{fmt(evaluation.get('checkpoint'))} (epoch {fmt(evaluation.get('epoch'))})"),
    ]
    per_class = as_dict(evaluation.get("per_class_accuracy"))
    report.per_class = [  # null: a class without test images
        (str(k), float(v)) for k, v in per_class.items() if isinstance(v, int | float)
    ]
    classes = next(
        (
            c
            for c in (evaluation.get("classes"), list(per_class), meta.get("classes"))
            if isinstance(c, list) and c
        ),
        [],
    )
    matrix = evaluation.get("confusion_matrix")
    if not isinstance(matrix, list):
        return
    counts = all(
        isinstance(r, list) and len(r) == len(matrix) and all(isinstance(n, int) for n in r) for r in matrix
    )
    if len(matrix) == len(classes) > 0 and counts:  # a hand-edited matrix that is not is left out
        report.confusion = Picture(
            "Confusion matrix (rows: true class; colour: share of the row)",
            data_uri(figures.confusion_heatmap(matrix, [str(c) for c in classes])),
        )


def _add_cam_results(report: RunReport, run: RunDir) -> None:
    for png in sorted(run.gradcam_dir.glob("*.png")):
        meta = as_dict(read_optional(run, png.with_suffix(".json")))
        facts = scalar_facts(meta, skip=("title", "maps"))
        report.gradcam.append(picture_file(png, describe(meta, png.stem), facts))
    faithfulness = read_optional(run, run.faithfulness_path)
    if faithfulness is not None:
        results = faithfulness if isinstance(faithfulness, list) else as_dict(faithfulness).get("results")
        report.faithfulness = table_of(results if isinstance(results, list) else [])
        report.faithfulness_facts = scalar_facts(as_dict(faithfulness))
    stems = {path.stem for path in run.sanity_dir.glob("*.json")}
    stems |= {path.stem for path in run.sanity_dir.glob("*.png")}
    for stem in sorted(stems):
        check = as_dict(read_optional(run, run.sanity_dir / f"{stem}.json"))
        png = run.sanity_dir / f"{stem}.png"
        title = describe(check, stem)
        steps = check.get("steps")
        report.sanity.append(
            SanityCheck(
                title,
                picture_file(png, title) if png.exists() else None,
                table_of(steps) if isinstance(steps, list) else None,
                scalar_facts(check, skip=("title",)),
            )
        )


def gather(run: RunDir) -> RunReport:
    """Read a trained run's files into a RunReport (metrics.json is required, the rest optional)."""
    epochs = run.read_epochs()
    meta = as_dict(read_optional(run, run.meta_path))
    config = as_dict(read_optional(run, run.config_path))
    name = run.name
    report = RunReport(
        name=name,
        generated=f"{now_iso()} by cifarcam {cifarcam.__version__}",
        status=str(meta.get("status", "unknown")),
        overview=_overview(meta, epochs),
        config=[(key, fmt(value)) for key, value in flatten(config).items()],
        curves=Picture("Loss, accuracy and learning rate per epoch", data_uri(figures.report_curves(epochs))),
        epochs=_epochs_table(epochs),
        hints={
            "meta": f"cifarcam train --run {name}",
            "evaluation": f"cifarcam evaluate --run {name}",
            "misclassified": f"cifarcam misclassified --run {name}",
            "gradcam": f"cifarcam gradcam --run {name} --layer layer4",
            "faithfulness": f"cifarcam gradcam --run {name} --metrics",
            "sanity": f"cifarcam sanity --run {name}",
        },
    )
    evaluation = read_optional(run, run.evaluation_path)
    if isinstance(evaluation, dict):
        _add_evaluation(report, evaluation, meta)
    if run.misclassified_png.exists():
        report.misclassified = picture_file(run.misclassified_png, "The most confident mistakes")
    mistakes = read_optional(run, run.misclassified_json)
    if isinstance(mistakes, list):
        rows = [as_dict(m) for m in mistakes]
        report.mistakes = Table(
            ["test index", "true", "predicted", "confidence"],
            [
                [fmt(m.get("index")), fmt(m.get("true")), fmt(m.get("pred")), percent(m.get("confidence"))]
                for m in rows
            ],
        )
    _add_cam_results(report, run)
    return report


def render(template: str, **values: Any) -> str:
    return _TEMPLATES.get_template(template).render(csp=CSP, sections=SECTIONS, **values)


def write_output(path: Path, content: str | bytes) -> Path:
    """Write a page or figure atomically; a failed write is one error line and leaves no file."""
    return write_outputs({path: content})[0]


def write_outputs(files: dict[Path, str | bytes]) -> list[Path]:
    """Write pages and figures together (`atomic_write_files`): a failed write is one error line
    and changes none of them."""
    try:
        atomic_write_files({p: c.encode("utf-8") if isinstance(c, str) else c for p, c in files.items()})
    except OSError as error:
        # mkdir names the parent that is in the way; the temporary file's name would only confuse.
        culprit = Path(written_file(str(error.filename))) if error.filename else None
        parent = next((p for p in files if culprit is not None and culprit in p.parents), None)
        path = culprit if culprit in files else parent or next(iter(files))
        where = f" ('{culprit}')" if parent is not None else ""
        raise RunError(f"cannot write '{path}': {error.strerror or error}{where}") from None
    return list(files)


@reads_run
def write_report(run: RunDir) -> Path:
    """Render the run's report into runs/NAME/report.html (atomically) and return its path."""
    report = gather(run)
    return write_output(run.report_path, render("report.html.j2", report=report))
