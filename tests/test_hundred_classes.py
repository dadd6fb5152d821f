"""The whole chain on a 100-class image folder (the shape of CIFAR-100): every command takes the
class count and names from the run."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import pytest
from conftest import invoke, write_image_folder

from cifarcam.data.datasets import synthetic_dataset


@pytest.fixture(scope="module")
def hundred(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 100-class tree (1,000 training and 500 test images) and a runs root to train into."""
    root = tmp_path_factory.mktemp("hundred")
    tree = write_image_folder(synthetic_dataset(1000, 500, num_classes=100, seed=7), root / "tree")
    return tree, root / "runs"


def test_the_whole_chain_on_a_hundred_classes(hundred: tuple[Path, Path], tmp_path: Path) -> None:
    tree, runs = hundred
    where = ("--run", "c100", "--runs-dir", str(runs))
    steps = [
        ("train", *where, "--data", str(tree), "--width", "8", "--epochs", "3", "--device", "cpu"),
        ("evaluate", *where),
        ("misclassified", *where, "--count", "5"),
        ("label-issues", *where, "--count", "5"),
        ("gradcam", *where, "--count", "3", "--target", "both"),
        ("sanity", *where, "--count", "4"),
        ("plot", *where),
        ("report", *where),
        ("export", *where, "--check-images", "100"),
    ]
    for args in steps:
        result = invoke(*args)
        assert result.exit_code == 0, (args[0], result.output)

    run = runs / "c100"
    classes = [f"class{i}" for i in range(100)]
    meta = json.loads((run / "meta.json").read_text())
    assert meta["classes"] == sorted(classes)  # image-folder classes: the sorted folder names
    evaluation = json.loads((run / "evaluation.json").read_text())
    assert len(evaluation["per_class_accuracy"]) == 100 and len(evaluation["confusion_matrix"]) == 100
    assert evaluation["accuracy"] > 0.05  # far above chance (1%) after three epochs
    for mistake in json.loads((run / "misclassified.json").read_text()):
        assert mistake["true"] in classes and mistake["pred"] in classes
    gallery = json.loads((run / "gradcam" / "gradcam_layer4.json").read_text())
    assert all(name in classes for name in gallery["true"] + gallery["pred"])
    card = (run / "export" / "MODEL_CARD.md").read_text()
    assert "100 classes" in card and "(N, 100) logits" in card
    html = (run / "report.html").read_text()
    assert html.count("<tr><td>class") >= 100  # a per-class row for each

    image = tmp_path / "x.png"
    source = next((tree / "test" / "class42").iterdir())
    cv2.imwrite(str(image), cv2.imread(str(source)))
    result = invoke("predict", *where, str(image), "--json", "--top-k", "100")
    assert result.exit_code == 0, result.output
    (entry,) = json.loads(result.stdout)["images"]
    assert sorted(row["class"] for row in entry["top_k"]) == sorted(classes)
