"""`cifarcam export`: model.onnx that onnxruntime runs like PyTorch, and MODEL_CARD.md."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from conftest import assert_only_locks_added, copy_tree, invoke, snapshot

from cifarcam.data.datasets import load_dataset, normalize
from cifarcam.runs.rundir import RunDir


def test_the_onnx_model_predicts_like_pytorch_at_any_batch_size(trained_runs: Path, tmp_path: Path) -> None:
    runs = copy_tree(trained_runs, tmp_path / "runs")
    result = invoke("export", "--run", "tiny", "--runs-dir", str(runs), "--check-images", "200")
    assert result.exit_code == 0, result.output
    assert "Checked against PyTorch on 200 test images: largest logit difference" in result.output
    folder = runs / "tiny" / "export"
    model_bytes = (folder / "model.onnx").read_bytes()
    metadata = {p.key: p.value for p in onnx.load_from_string(model_bytes).metadata_props}
    run = RunDir(runs, "tiny")
    pytorch_model, info = run.load_model("last")
    assert json.loads(metadata["classes"]) == info.classes
    assert json.loads(metadata["mean"]) == list(info.mean) and json.loads(metadata["std"]) == list(info.std)

    config = json.loads((runs / "tiny" / "config.json").read_text())
    test = load_dataset(config["data"], Path(config["data_dir"])).test
    session = onnxruntime.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    for count in (1, 7, 200):  # the batch dimension is free
        x = normalize(test.images[:count], info.mean, info.std)
        (logits,) = session.run(["logits"], {"images": x.numpy()})
        with torch.no_grad():
            expected = pytorch_model.eval()(x).numpy()
        assert logits.shape == (count, len(info.classes))
        assert np.abs(logits - expected).max() < 1e-3
        assert (logits.argmax(1) == expected.argmax(1)).all()


def test_the_model_card_says_what_the_run_holds(reported_runs: Path, tmp_path: Path) -> None:
    runs = copy_tree(reported_runs, tmp_path / "runs")
    out = tmp_path / "shipped"
    result = invoke(
        "export", "--run", "tiny", "--runs-dir", str(runs), "--out", str(out), "--check-images", "50"
    )
    assert result.exit_code == 0, result.output
    card = (out / "MODEL_CARD.md").read_text()
    evaluation = json.loads((runs / "tiny" / "evaluation.json").read_text())
    assert f"Test accuracy: {evaluation['accuracy']:.2%}, with TTA" in card
    assert f"{evaluation['accuracy_tta']:.2%}, on 200 test images" in card
    for name, accuracy in evaluation["per_class_accuracy"].items():
        assert f"| {name} | {accuracy:.2%} |" in card
    assert "![Grad-CAM of the most confident mistakes](gradcam.png)" in card
    assert (out / "gradcam.png").read_bytes().startswith(b"\x89PNG")
    assert "Cascading randomisation sanity check of gradcam at layer4 (4 test images)" in card
    assert "| none | 1.000 | 1.000 |" in card
    assert "The ONNX model was checked against PyTorch on 50 test images" in card
    assert 'session.run(["logits"], {"images": x})' in card

    assert invoke("export", "--run", "tiny", "--runs-dir", str(runs)).exit_code == 0
    assert invoke("report", "--run", "tiny", "--runs-dir", str(runs)).exit_code == 0
    assert '<a href="export/MODEL_CARD.md">model card</a>' in (runs / "tiny" / "report.html").read_text()


def test_a_card_of_a_bare_run_names_the_commands_that_add_to_it(trained_runs: Path, tmp_path: Path) -> None:
    runs = copy_tree(trained_runs, tmp_path / "runs")
    assert invoke("export", "--run", "tiny", "--runs-dir", str(runs), "--check-images", "10").exit_code == 0
    card = (runs / "tiny" / "export" / "MODEL_CARD.md").read_text()
    assert "with TTA: not measured (`cifarcam evaluate --run tiny` measures it)" in card
    assert "None yet: `cifarcam gradcam --run tiny` and `cifarcam sanity --run tiny`." in card


@pytest.mark.parametrize("module", ["onnx", "onnxscript", "onnxruntime"])
def test_without_the_export_extra_export_is_one_line_and_writes_nothing(
    trained_runs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # as when it is not installed
    runs = copy_tree(trained_runs, tmp_path / "runs")
    before = snapshot(runs)
    result = invoke("export", "--run", "tiny", "--runs-dir", str(runs))
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "Error: export needs onnx, onnxscript and onnxruntime, which are not installed",
        'Hint: pip install "cifarcam[export]"',
    ]
    assert_only_locks_added(before, runs)


def test_export_never_writes_into_another_run(trained_runs: Path, tmp_path: Path) -> None:
    runs = copy_tree(trained_runs, tmp_path / "runs")
    copy_tree(runs / "tiny", runs / "other")
    before = snapshot(runs)
    result = invoke("export", "--run", "tiny", "--runs-dir", str(runs), "--out", str(runs / "other" / "x"))
    assert result.exit_code == 2
    assert result.stderr.splitlines()[0] == (
        f"Error: --out '{runs / 'other' / 'x'}' is inside run 'other'; export writes into its own run only"
    )
    assert_only_locks_added(before, runs)
