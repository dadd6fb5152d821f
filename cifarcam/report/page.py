"""A run's report: its files gathered into plain values and rendered into one HTML page that embeds
every image as a data: URI and forbids any request (Content-Security-Policy), so it opens offline."""

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
    "label-issues": "Likely label errors",
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
# The entries of a gallery's and a sanity check's JSON that describe it as a whole.
_GALLERY_FACTS = ("methods", "layers", "targets", "checkpoint", "epoch")
_SANITY_FACTS = ("method", "layer", "images", "target", "seed", "checkpoint")


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
    steps: Table
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
    evaluation: list[tuple[str, str]] | None = None
    per_class: list[tuple[str, float]] | None = None
    confusion: Picture | None = None
    misclassified: Picture | None = None
    mistakes: Table | None = None
    marked_mistakes: list[int] = field(default_factory=list)  # test indices of likely label errors
    label_issues: Picture | None = None
    label_issue_table: Table | None = None
    label_issue_facts: list[tuple[str, str]] = field(default_factory=list)
    gradcam: list[Picture] = field(default_factory=list)
    faithfulness: Table | None = None
    sanity: list[SanityCheck] = field(default_factory=list)
    model_card: str | None = None  # the exported model's card, relative to the report


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


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


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


def table_of(records: list[dict[str, Any]]) -> Table:
    """Records as a table whose columns are all their keys, in order of first appearance."""
    columns = list(dict.fromkeys(key for record in records for key in record))
    return Table(columns, [[fmt(record.get(column)) for column in columns] for record in records])


def facts_of(record: dict[str, Any], keys: tuple[str, ...]) -> list[tuple[str, str]]:
    return [(key, fmt(record[key])) for key in keys if record.get(key) is not None]


def read_optional(run: RunDir, path: Path) -> Any:
    """A JSON file's value, or None when it does not exist (a corrupt file is an error)."""
    return run.read_json(path) if path.exists() else None


def wall_time(meta: dict[str, Any]) -> str:
    """From the run's start to its end; a dash while it runs, or after it was killed."""
    if not meta.get("ended_at"):
        return "-"
    ended, started = (datetime.fromisoformat(meta[key]) for key in ("ended_at", "started_at"))
    seconds = (ended - started).total_seconds()
    return f"{seconds / 60:.1f} min ({seconds:.0f} s)"


def mean_epoch_time(epochs: list[dict[str, Any]]) -> float:
    return statistics.mean(epoch["epoch_time_s"] for epoch in epochs)


def _overview(meta: dict[str, Any], epochs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    versions = [
        f"{name} {meta[f'{name}_version']}"
        for name in ("cifarcam", "torch", "python")
        if f"{name}_version" in meta
    ]
    rows = [
        ("status", fmt(meta.get("status", "unknown"))),
        ("started / ended", f"{fmt(meta.get('started_at'))} / {fmt(meta.get('ended_at'))}"),
        ("wall time", wall_time(meta)),
        ("epochs completed", str(len(epochs))),
        ("time per epoch", f"{mean_epoch_time(epochs):.1f} s (mean of {len(epochs)})"),
        ("device", " ".join(fmt(meta[k]) for k in ("device", "device_name") if k in meta) or "-"),
        ("precision", fmt(meta.get("precision"))),
        ("data", fmt(meta.get("data"))),
        (
            "images (train / validation / test)",
            " / ".join(fmt(meta.get(k)) for k in ("train_images", "val_images", "test_images")),
        ),
        ("classes", fmt(meta.get("classes"))),
        ("versions", ", ".join(versions) or "-"),
        ("command", fmt(meta.get("command"))),
    ]
    if meta.get("error"):
        rows.insert(1, ("error", fmt(meta["error"])))
    return rows


def _epochs_table(epochs: list[dict[str, Any]]) -> Table:
    """Every epoch's record (`train` writes the same keys each epoch), accuracies in percent."""
    columns = list(epochs[0])
    rows = [[percent(r[c]) if c.endswith("_acc") else fmt(r[c]) for c in columns] for r in epochs]
    return Table(columns, rows)


def _add_evaluation(report: RunReport, evaluation: dict[str, Any]) -> None:
    report.evaluation = [
        ("accuracy", percent(evaluation["accuracy"])),
        ("accuracy with test-time augmentation", percent(evaluation.get("accuracy_tta"))),
        ("mean loss / with TTA", f"{fmt(evaluation['loss'])} / {fmt(evaluation.get('loss_tta'))}"),
        ("test images", fmt(evaluation["num_images"])),
        ("checkpoint", f"{evaluation['checkpoint']} (epoch {evaluation['epoch']})"),
    ]
    per_class = evaluation["per_class_accuracy"].items()  # null: a class without test images
    report.per_class = [(name, accuracy) for name, accuracy in per_class if accuracy is not None]
    report.confusion = Picture(
        "Confusion matrix (rows: true class; colour: share of the row)",
        data_uri(figures.confusion_heatmap(evaluation["confusion_matrix"], evaluation["classes"])),
    )


def _mistakes_table(mistakes: list[dict[str, Any]]) -> Table:
    return Table(
        ["test index", "true", "predicted", "confidence", "label"],
        [
            [
                fmt(m["index"]),
                m["true"],
                m["pred"],
                percent(m["confidence"]),
                "likely wrong" if m.get("likely_label_issue") else "",
            ]
            for m in mistakes
        ],
    )


# Rows of the report's label-issue table: the first of label_issues.json, whose gallery shows them.
LABEL_ISSUE_ROWS = 50


def _add_label_issues(report: RunReport, run: RunDir, document: dict[str, Any]) -> None:
    issues = document["issues"]
    report.label_issue_facts = [
        ("found", f"{len(issues)} of {fmt(document['test_images'])} test images"),
        *facts_of(document, ("checkpoint", "epoch", "method")),
    ]
    report.label_issue_table = Table(
        ["rank", "test index", "given", "suggested", "quality", "confidence"],
        [
            [
                str(rank),
                fmt(i["index"]),
                i["given"],
                i["suggested"],
                fmt(i["quality"]),
                percent(i["confidence"]),
            ]
            for rank, i in enumerate(issues[:LABEL_ISSUE_ROWS], start=1)
        ],
    )
    if run.label_issues_png.exists():
        report.label_issues = picture_file(run.label_issues_png, "The likely label errors ranked first")


def _galleries(run: RunDir) -> list[Picture]:
    """gradcam/*.png, each described by its JSON."""
    galleries = []
    for png in sorted(run.gradcam_dir.glob("*.png")):
        record = read_optional(run, png.with_suffix(".json")) or {}
        galleries.append(picture_file(png, record.get("title", png.stem), facts_of(record, _GALLERY_FACTS)))
    return galleries


def _sanity_checks(run: RunDir) -> list[SanityCheck]:
    """sanity/*.json, each with its plot."""
    checks = []
    for path in sorted(run.sanity_dir.glob("*.json")):
        check = run.read_json(path)
        title = f"{check['method']} at {check['layer']}" if check["layer"] else check["method"]
        png = path.with_suffix(".png")
        picture = picture_file(png, title) if png.exists() else None
        checks.append(SanityCheck(title, picture, table_of(check["steps"]), facts_of(check, _SANITY_FACTS)))
    return checks


def gather(run: RunDir) -> RunReport:
    """Read a trained run's files into a RunReport (metrics.json is required, the rest optional)."""
    epochs = run.read_epochs()
    meta = read_optional(run, run.meta_path) or {}
    config = read_optional(run, run.config_path) or {}
    mistakes = read_optional(run, run.misclassified_json)
    faithfulness = read_optional(run, run.faithfulness_path)
    report = RunReport(
        name=run.name,
        generated=f"{now_iso()} by cifarcam {cifarcam.__version__}",
        status=str(meta.get("status", "unknown")),
        overview=_overview(meta, epochs),
        config=[(key, fmt(value)) for key, value in flatten(config).items()],
        curves=Picture("Loss, accuracy and learning rate per epoch", data_uri(figures.report_curves(epochs))),
        epochs=_epochs_table(epochs),
        misclassified=(
            picture_file(run.misclassified_png, "The most confident mistakes")
            if run.misclassified_png.exists()
            else None
        ),
        mistakes=_mistakes_table(mistakes) if mistakes is not None else None,
        gradcam=_galleries(run),
        faithfulness=table_of(faithfulness["results"]) if faithfulness is not None else None,
        sanity=_sanity_checks(run),
        model_card=("export/MODEL_CARD.md" if (run.export_dir / "MODEL_CARD.md").exists() else None),
    )
    if mistakes is not None:
        report.marked_mistakes = [m["index"] for m in mistakes if m.get("likely_label_issue")]
    label_issues = read_optional(run, run.label_issues_json)
    if label_issues is not None:
        _add_label_issues(report, run, label_issues)
    evaluation = read_optional(run, run.evaluation_path)
    if evaluation is not None:
        _add_evaluation(report, evaluation)
    return report


def render(template: str, **values: Any) -> str:
    return _TEMPLATES.get_template(template).render(csp=CSP, sections=SECTIONS, **values)


def write_outputs(files: dict[Path, str | bytes]) -> list[Path]:
    """Write pages and figures at once (`atomic_write_files`); a failure is one RunError line."""
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
    return write_outputs({run.report_path: render("report.html.j2", report=report)})[0]
