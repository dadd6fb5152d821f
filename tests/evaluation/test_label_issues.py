"""`cifarcam label-issues`: likely label errors of the test set (cleanlab), and their marks in
misclassified, gradcam and the report.

The check you can see: a small image-folder data set whose test labels were flipped for known
images, trained briefly; the flipped images must come first among those flagged."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    assert_only_locks_added,
    copy_tree,
    invoke,
    snapshot,
    tiny_train_args,
    write_image_folder,
)

from cifarcam.data.datasets import load_dataset, synthetic_dataset
from cifarcam.evaluation.label_issues import MIN_IMAGES_PER_CLASS, find_label_issues
from cifarcam.explain.stored_maps import target_heading

FLIPPED = 10  # test images moved to the next class's folder, among 200
# The first FLIPPED flagged images (fewer where fewer are flagged): measured, 8 images flagged
# in all, each of them a flipped one (precision 1.0), 8 of the 10 flipped found (recall 0.8);
# cleanlab 2.9, torch 2.14.1, Intel Xeon CPU. A chance ranking of 200 images would hold about
# 0.5 flipped ones in its first 10.
MIN_PRECISION, MIN_RECALL = 0.8, 0.6


@pytest.fixture(scope="module")
def flipped(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, set[int]]:
    """A runs root with run 'r', trained on a tree whose FLIPPED test images carry the next
    class's label, and the test indices of those images."""
    dataset = synthetic_dataset(400, 200, seed=11)
    labels = dataset.test.labels
    chosen = torch.arange(0, len(labels), len(labels) // FLIPPED)[:FLIPPED]
    labels[chosen] = (labels[chosen] + 1) % len(dataset.classes)
    root = tmp_path_factory.mktemp("flipped")
    tree = write_image_folder(dataset, root / "tree")
    runs = root / "runs"
    result = invoke(*tiny_train_args(runs, tree, epochs=4), "--width", "8", "--batch-size", "50")
    assert result.exit_code == 0, result.output
    loaded = load_dataset(str(tree), root / "cache")  # the order the run's test indices follow
    images = loaded.test.images.flatten(1)
    indices = {int((images == image.flatten()).all(1).nonzero()) for image in dataset.test.images[chosen]}
    assert len(indices) == FLIPPED
    return runs, indices


def test_flipped_labels_are_ranked_first(flipped: tuple[Path, set[int]], tmp_path: Path) -> None:
    runs, flipped_indices = flipped
    runs = copy_tree(runs, tmp_path / "runs")
    result = invoke("label-issues", "--run", "r", "--runs-dir", str(runs), "--count", "12")
    assert result.exit_code == 0, result.output
    document = json.loads((runs / "r" / "label_issues.json").read_text())
    issues = document["issues"]
    top = [issue["index"] for issue in issues[:FLIPPED]]
    precision = len(flipped_indices & set(top)) / len(top)
    recall = len(flipped_indices & set(top)) / FLIPPED
    print(f"top {len(top)} flagged: precision {precision:.2f}, recall {recall:.2f}")
    assert precision >= MIN_PRECISION and recall >= MIN_RECALL, (top, sorted(flipped_indices))
    qualities = [issue["quality"] for issue in issues]
    assert qualities == sorted(qualities)  # most likely label error first
    for issue in issues:
        assert issue["given"] == f"class{issue['given_label']}"
        assert issue["suggested_label"] != issue["given_label"]
        assert 0 <= issue["quality"] <= 1 and 0 < issue["confidence"] <= 1
    flipped_issue = next(i for i in issues if i["index"] in flipped_indices)
    assert flipped_issue["suggested_label"] == (flipped_issue["given_label"] - 1) % 10  # the label it had
    assert document["test_images"] == 200 and document["checkpoint"] == "last"
    assert (runs / "r" / "label_issues.png").read_bytes().startswith(b"\x89PNG")
    assert f"{len(issues)} likely label errors in the test set" in result.output


def test_mistakes_and_their_explanations_mark_likely_label_errors(
    flipped: tuple[Path, set[int]], tmp_path: Path
) -> None:
    runs, flipped_indices = flipped
    runs = copy_tree(runs, tmp_path / "runs")
    args = ("--run", "r", "--runs-dir", str(runs), "--count", "5")
    assert invoke("label-issues", *args).exit_code == 0
    issues = {i["index"] for i in json.loads((runs / "r" / "label_issues.json").read_text())["issues"]}
    result = invoke("misclassified", *args)
    assert result.exit_code == 0, result.output
    mistakes = json.loads((runs / "r" / "misclassified.json").read_text())
    marked = {m["index"] for m in mistakes if m["likely_label_issue"]}
    assert marked == issues & {m["index"] for m in mistakes}  # the same finding as label-issues
    assert marked & flipped_indices, "the confident mistakes include flipped images"
    assert result.output.count("likely wrong") == len(marked)

    assert invoke("gradcam", *args, "--target", "both").exit_code == 0
    gallery = json.loads((runs / "r" / "gradcam" / "gradcam_layer4.json").read_text())
    assert gallery["likely_label_issue"] == [i in issues for i in gallery["indices"]]

    assert invoke("report", "--run", "r", "--runs-dir", str(runs)).exit_code == 0
    html = (runs / "r" / "report.html").read_text()
    assert '<section id="label-issues">' in html and 'href="#label-issues"' in html
    assert f"{len(marked)} of these mistakes" in html


def test_a_likely_label_error_is_explained_for_its_given_and_suggested_label() -> None:
    """gradcam's columns for a flagged image name what they explain: the given label (the test
    set's) and the suggested one (the model's prediction), not a "true class"."""
    assert [target_heading(key, label_issue=True) for key in ("true", "pred", "class:cat")] == [
        "given label",
        "suggested label",
        "class cat",
    ]
    assert [target_heading(key, label_issue=False) for key in ("true", "pred")] == [
        "true class",
        "pred class",
    ]


def test_without_cleanlab_label_issues_is_one_line_and_misclassified_says_why(
    trained_runs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "cleanlab", None)  # as when the extra is not installed
    monkeypatch.setitem(sys.modules, "cleanlab.filter", None)
    runs = copy_tree(trained_runs, tmp_path / "runs")
    before = snapshot(runs)
    result = invoke("label-issues", "--run", "tiny", "--runs-dir", str(runs))
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "Error: finding label issues needs cleanlab, which is not installed",
        'Hint: pip install "cifarcam[labels]"',
    ]
    assert_only_locks_added(before, runs)
    assert not (runs / "tiny" / "label_issues.json").exists()

    result = invoke("misclassified", "--run", "tiny", "--runs-dir", str(runs), "--count", "3")
    assert result.exit_code == 0, result.output
    assert "Likely label errors are not marked: finding label issues needs cleanlab" in result.output
    mistakes = json.loads((runs / "tiny" / "misclassified.json").read_text())
    assert [m["likely_label_issue"] for m in mistakes] == [None] * 3


def test_too_few_test_images_of_a_class_is_a_clear_error() -> None:
    labels = torch.tensor([0] * 20 + [1] * (MIN_IMAGES_PER_CLASS - 1))
    probs = torch.softmax(torch.randn(len(labels), 2), dim=1)
    with pytest.raises(Exception, match=r"at least 5 test images of every class; class 'b' has 4 of the 24"):
        find_label_issues(probs, labels, ["a", "b"])
    absent = torch.tensor([0] * 20)  # a class without test images at all
    with pytest.raises(Exception, match=r"class 'b' has 0 of the 20"):
        find_label_issues(torch.softmax(torch.randn(20, 2), dim=1), absent, ["a", "b"])


def test_a_clean_test_set_has_no_label_issues() -> None:
    """A model that is confidently right about every label flags none of them."""
    labels = torch.arange(40) % 4
    probs = torch.full((40, 4), 0.01).scatter_(1, labels[:, None], 0.97)
    issues = find_label_issues(probs, labels, ["a", "b", "c", "d"])
    assert len(issues.indices) == 0 and issues.mask(40).sum() == 0
