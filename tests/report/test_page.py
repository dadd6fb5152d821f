"""The report and compare pages, read as HTML: sections, embedded images, escaping, missing inputs."""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import HOSTILE_CLASS, copy_tree, tiny_train_args
from typer.testing import CliRunner

from cifarcam.cli import app
from cifarcam.report.page import CSP, LABEL_ISSUE_ROWS, SECTIONS

runner = CliRunner()


class Page(HTMLParser):
    """The parts of a page the tests look at: tags with their attributes, and the visible text."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {key: value or "" for key, value in attrs}))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def all(self, tag: str) -> list[dict[str, str]]:
        return [attrs for name, attrs in self.tags if name == tag]

    def section_text(self) -> str:
        return " ".join(" ".join(self.text).split())


def decode_png(uri: str) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert uri.startswith(prefix), uri[:40]
    image = cv2.imdecode(np.frombuffer(base64.b64decode(uri[len(prefix) :]), np.uint8), cv2.IMREAD_COLOR)
    assert image is not None and image.size > 0
    return image


def test_report_shows_every_section_of_a_real_run(reported_runs: Path) -> None:
    run = reported_runs / "tiny"
    html = (run / "report.html").read_text()
    page = Page(html)
    assert {attrs.get("id") for attrs in page.all("section")} == set(SECTIONS)
    assert [a["content"] for a in page.all("meta") if a.get("http-equiv") == "Content-Security-Policy"] == [
        CSP
    ]
    assert not page.all("script") and not page.all("link")
    assert all(a["href"].startswith("#") for a in page.all("a"))
    images = [decode_png(a["src"]) for a in page.all("img")]
    # curves, confusion matrix, misclassified, label issues, one Grad-CAM gallery, one sanity plot
    assert len(images) == 6
    assert all(image.shape[0] > 100 and image.shape[1] > 100 for image in images)
    assert 'class="missing"' not in html  # every input is there, so no section asks for a command

    text = page.section_text()
    evaluation = json.loads((run / "evaluation.json").read_text())
    assert f"{evaluation['accuracy']:.2%}" in text and f"{evaluation['accuracy_tta']:.2%}" in text
    for name, accuracy in evaluation["per_class_accuracy"].items():
        assert f"{name} {accuracy * 100:.2f}%" in text
    for mistake in json.loads((run / "misclassified.json").read_text()):
        assert f"{mistake['index']} {mistake['true']} {mistake['pred']} {mistake['confidence']:.2%}" in text
    issues = json.loads((run / "label_issues.json").read_text())["issues"]
    assert f"found {len(issues)} of 200 test images" in text
    for rank, issue in enumerate(issues[:LABEL_ISSUE_ROWS], start=1):
        assert f"{rank} {issue['index']} {issue['given']} {issue['suggested']}" in text
    meta = json.loads((run / "meta.json").read_text())
    assert f"torch {meta['torch_version']}" in text and "status finished" in text
    assert "methods gradcam, gradcam++ layers layer4 targets pred, true" in text  # what its columns show
    header = (
        "method layer target images deletion_auc insertion_auc average_drop increase_in_confidence selection"
    )
    assert header in text
    rows = json.loads((run / "gradcam" / "metrics.json").read_text())["results"]
    assert [(r["method"], r["layer"]) for r in rows] == [
        ("gradcam", "layer4"),
        ("gradcam++", "layer4"),
        ("random", "-"),
    ]
    assert f"random - pred 5 {rows[2]['deletion_auc']:.4g}" in text  # the baseline row
    assert "gradcam at layer4 randomized spearman spearman_std ssim ssim_std none 1 0 1 0 linear" in text
    epochs = json.loads((run / "metrics.json").read_text())["epochs"]
    assert f"epochs completed {len(epochs)}" in text


def test_sections_without_inputs_name_the_command(trained_runs: Path, tmp_path: Path) -> None:
    runs = copy_tree(trained_runs, tmp_path / "runs")
    result = runner.invoke(app, ["report", "--run", "tiny", "--runs-dir", str(runs)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"Wrote {runs / 'tiny' / 'report.html'}"
    text = Page((runs / "tiny" / "report.html").read_text()).section_text()
    for command in ("evaluate", "misclassified", "label-issues", "gradcam", "sanity"):
        assert "produces it" in text and f"cifarcam {command} --run tiny" in text
    assert "cifarcam gradcam --run tiny --metrics" in text
    assert "No gradcam/metrics.json yet" in text and "No sanity check (sanity/*.json) yet" in text
    assert len(Page((runs / "tiny" / "report.html").read_text()).all("img")) == 1  # the curves
    assert not [p for p in (runs / "tiny").iterdir() if p.name.endswith(".tmp")]


def test_hostile_names_are_escaped(hostile_runs: Path) -> None:
    html = (hostile_runs / "hostile" / "report.html").read_text()
    for raw in (
        "<script>alert(1)</script>",
        "<script>alert(2)</script>",
        "<script>alert(3)</script>",
        "<img src=x",
    ):
        assert raw not in html
    page = Page(html)
    assert not page.all("script")
    assert all(a["src"].startswith("data:image/png;base64,") for a in page.all("img"))
    text = page.section_text()
    assert HOSTILE_CLASS in text  # shown as text: per-class table, classes, confusion labels
    assert "<script>alert(1)</script>" in text and "<script>alert(3)</script>" in text


@pytest.fixture(scope="module")
def two_runs(trained_runs: Path, synthetic_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """'tiny' (width 8, 2 epochs, validation split) and 'r' (width 4, 3 epochs) in one runs root."""
    runs = copy_tree(trained_runs, tmp_path_factory.mktemp("compare") / "runs")
    result = runner.invoke(app, tiny_train_args(runs, synthetic_tree, run="r", epochs=3))
    assert result.exit_code == 0, result.output
    return runs


def test_compare_writes_curves_and_the_config_differences(two_runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "cmp.html"
    result = runner.invoke(app, ["compare", "tiny", "r", "--runs-dir", str(two_runs), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"Wrote {out}, {out.with_suffix('.png')}"
    png = cv2.imread(str(out.with_suffix(".png")))
    assert png is not None and png.shape[1] > 2 * png.shape[0]  # loss, accuracy and LR side by side
    page = Page(out.read_text())
    [image] = [decode_png(a["src"]) for a in page.all("img")]
    assert image.shape == png.shape
    text = page.section_text()
    epochs = {
        name: json.loads((two_runs / name / "metrics.json").read_text())["epochs"] for name in ("tiny", "r")
    }
    for name, records in epochs.items():
        last = records[-1]
        assert f"{name} finished {len(records)} {last['train_loss']:.4g} {last['test_loss']:.4g}" in text
    differences = (
        "width 8 4 epochs 2 3 batch_size 64 100 lr 0.05 0.07812 val_split 50 0 meta.train_images 350 400"
    )
    assert differences in text
    shared = text.split("value in every run", 1)[1]  # shared settings, listed once
    assert "model resnet18" in shared and "warmup 0.2" in shared and text.count("warmup 0.2") == 1


def test_paths_print_as_they_are_even_with_brackets(two_runs: Path, tmp_path: Path) -> None:
    """Rich markup is off: '[/]' in a path is neither a closing tag nor dropped."""
    out = tmp_path / "a[/]b[bold]" / "cmp.html"
    result = runner.invoke(app, ["compare", "tiny", "r", "--runs-dir", str(two_runs), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"Wrote {out}, {out.with_suffix('.png')}"
    assert out.exists()


def test_compare_defaults_to_the_runs_dir(two_runs: Path, tmp_path: Path) -> None:
    runs = copy_tree(two_runs, tmp_path / "runs")
    result = runner.invoke(app, ["compare", "r", "tiny", "--runs-dir", str(runs)])
    assert result.exit_code == 0, result.output
    assert (runs / "compare.html").exists() and cv2.imread(str(runs / "compare.png")) is not None
