"""Every bad input gets one clear line and a documented exit code; nothing earlier is lost.

The table below is the one in docs/reliability.md ("Bad inputs"). Each case runs the real CLI on real
files: a trained run (copied per case), the synthetic image tree, damaged copies of them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
from conftest import copy_tree, tiny_train_args
from typer.testing import CliRunner

from cifarcam.cli import app
from cifarcam.runs.rundir import RunDir

runner = CliRunner()


def damage_tree(tree: Path, how: str) -> None:
    cls = tree / "train" / "class1"
    if how == "no_test":
        shutil.rmtree(tree / "test")
    elif how == "mismatch":
        (tree / "test" / "class1").rename(tree / "test" / "klass1")
    elif how == "non_image":
        (cls / "notes.txt").write_text("not an image")
    elif how == "wrong_size":
        cv2.imwrite(str(cls / "big.png"), np.zeros((64, 48, 3), np.uint8))
    elif how == "empty":
        for folder in (tree / "train").iterdir():
            shutil.rmtree(folder)
            folder.mkdir()


def damage_run(run: Path, how: str) -> None:
    checkpoint = run / "checkpoints" / "last.safetensors"
    if how == "truncated":
        checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    elif how == "garbage":
        checkpoint.write_bytes(b"\x00" * 64)
    elif how == "other_width":
        config = json.loads((run / "config.json").read_text())
        config["width"] = 16
        (run / "config.json").write_text(json.dumps(config))
    elif how == "other_test_images":  # as if the test images were replaced after training
        meta = json.loads((run / "meta.json").read_text())
        assert len(meta["test_fingerprint"]) > 8
        (run / "meta.json").write_text(json.dumps(meta | {"test_fingerprint": "0" * 16}))
    elif how == "config_width_text":
        config = json.loads((run / "config.json").read_text())
        (run / "config.json").write_text(json.dumps(config | {"width": "wide"}))
    elif how == "bad_config":
        (run / "config.json").write_text("{")
    elif how == "bad_evaluation":
        (run / "evaluation.json").write_text('{"accuracy": 0.')
    elif how == "no_metrics":
        (run / "metrics.json").unlink()
    elif how == "no_state":  # of a run that has not finished (a finished one has nothing to resume)
        (run / "checkpoints" / "state.safetensors").unlink()
        meta = json.loads((run / "meta.json").read_text())
        (run / "meta.json").write_text(json.dumps(meta | {"status": "interrupted"}))
    elif how == "lost_meta_and_checkpoint":
        (run / "meta.json").unlink()
        checkpoint.unlink()
    elif how == "corrupt_state":
        (run / "checkpoints" / "state.safetensors").write_bytes(b"junk")
        meta = json.loads((run / "meta.json").read_text())
        (run / "meta.json").write_text(json.dumps(meta | {"status": "interrupted"}))


def pipeline_file(transforms: list[Any], change: dict[str, Any] | None = None) -> str:
    """A config file naming an albumentations pipeline; `change` edits its first transform."""
    pipeline = A.to_dict(A.Compose(transforms))
    pipeline["transform"]["transforms"][0].update(change or {})
    return json.dumps({"albumentations": pipeline, "workers": 0}, separators=(",", ":"))


RESIZING_PIPELINE = pipeline_file([A.Resize(64, 64)])

# (id, what to prepare, arguments, exit code, first line of stderr). Placeholders: {runs} the
# runs root (holding the trained run 'tiny'), {tree} a copy of the synthetic image tree,
# {tmp} a scratch folder.
CASES = [
    ("missing run", None, "evaluate --run nope", 1, "Error: run 'nope' does not exist in '{runs}'"),
    (
        "run name with /",
        None,
        "train --run a/b --data {tree}",
        2,
        "Error: invalid run name 'a/b': use letters, digits, '.', '_' and '-' (starting with a letter or digit, no '..', at most 100 characters)",
    ),
    (
        "run name ..",
        None,
        "evaluate --run ..",
        2,
        "Error: invalid run name '..': use letters, digits, '.', '_' and '-' (starting with a letter or digit, no '..', at most 100 characters)",
    ),
    (
        "run name ../escape",
        None,
        "train --run ../escape --data {tree}",
        2,
        "Error: invalid run name '../escape': use letters, digits, '.', '_' and '-' (starting with a letter or digit, no '..', at most 100 characters)",
    ),
    (
        "unknown model",
        None,
        "train --run r --data {tree} --model resnet19",
        2,
        "Error: invalid value for 'model': Input should be 'resnet18' or 'resnet34' (got 'resnet19')",
    ),
    (
        "unknown layer",
        None,
        "gradcam --run tiny --layer layer5",
        2,
        "Error: unknown layer 'layer5'; top-level layers are: conv1, bn1, relu, layer1, layer2, layer3, layer4, linear (dotted names like layer4.1.conv2 reach inside them); did you mean 'layer4'?",
    ),
    (
        "truncated checkpoint",
        "run:truncated",
        "evaluate --run tiny",
        1,
        "Error: checkpoint '{runs}/tiny/checkpoints/last.safetensors' is corrupt or truncated",
    ),
    (
        "garbage checkpoint",
        "run:garbage",
        "gradcam --run tiny",
        1,
        "Error: checkpoint '{runs}/tiny/checkpoints/last.safetensors' is corrupt or truncated",
    ),
    (
        "malformed config JSON",
        "file:{",
        "train --run r --data {tree} --config {tmp}/c.json",
        2,
        "Error: config file '{tmp}/c.json' is not valid JSON: Expecting property name enclosed in double quotes at line 1",
    ),
    (
        "config with an unknown key",
        'file:{"epochs": 2, "optimiser": "adam"}',
        "train --run r --config {tmp}/c.json",
        2,
        "Error: unknown config field 'optimiser'",
    ),
    (
        "out-of-range value",
        None,
        "train --run r --data {tree} --epochs 0",
        2,
        "Error: invalid value for 'epochs': Input should be greater than or equal to 1 (got 0)",
    ),
    (
        "negative learning rate",
        None,
        "train --run r --data {tree} --lr -0.1",
        2,
        "Error: invalid value for 'lr': Input should be greater than 0 (got -0.1)",
    ),
    (
        "label smoothing of 1",
        None,
        "train --run r --data {tree} --label-smoothing 1",
        2,
        "Error: invalid value for 'label_smoothing': Input should be less than 1 (got 1.0)",
    ),
    (
        "fp16 without CUDA",
        None,
        "train --run r --data {tree} --device cpu --precision fp16",
        2,
        "Error: --precision fp16 needs CUDA (the device is cpu); use bf16 or fp32",
    ),
    (
        "epochs of no images",
        None,
        "train --run r --data {tree} --epoch-images 0",
        2,
        "Error: invalid value for 'epoch_images': Input should be greater than or equal to 1 (got 0)",
    ),
    (
        "image folder without test/",
        "tree:no_test",
        "train --run r --data {tree}",
        1,
        "Error: data folder '{tree}' has no 'test/' folder",
    ),
    (
        "mismatched class folders",
        "tree:mismatch",
        "train --run r --data {tree}",
        1,
        "Error: class folders differ between '{tree}/train' and '{tree}/test': ['class0', 'class1', 'class2', 'class3', 'class4', 'class5', 'class6', 'class7', 'class8', 'class9'] vs ['class0', 'class2', 'class3', 'class4', 'class5', 'class6', 'class7', 'class8', 'class9', 'klass1']",
    ),
    (
        "non-image file",
        "tree:non_image",
        "train --run r --data {tree}",
        1,
        "Error: '{tree}/train/class1/notes.txt' is not a readable image",
    ),
    (
        "wrong-size image",
        "tree:wrong_size",
        "train --run r --data {tree}",
        1,
        "Error: '{tree}/train/class1/big.png' is not a 32x32 8-bit RGB image (shape (64, 48, 3), uint8)",
    ),
    (
        "empty image folder",
        "tree:empty",
        "train --run r --data {tree}",
        1,
        "Error: '{tree}/train' holds no images",
    ),
    (
        "missing data folder",
        None,
        "train --run r --data {tmp}/nowhere",
        1,
        "Error: data folder '{tmp}/nowhere' does not exist",
    ),
    ("--count larger than the mistakes", None, "misclassified --run tiny --count 100000", 1, "Error: only "),
    ("--count 0", None, "gradcam --run tiny --count 0", 2, "Error: --count must be at least 1"),
    (
        "--subset larger than the data",
        None,
        "train --run r --data {tree} --subset 5000",
        2,
        "Error: --subset 5000 is larger than the 400 training images",
    ),
    (
        "--val-split larger than the data",
        None,
        "train --run r --data {tree} --val-split 500",
        2,
        "Error: --val-split 500 is larger than the 400 training images",
    ),
    (
        "no training images left",
        None,
        "train --run r --data {tree} --val-split 400",
        2,
        "Error: no training images are left after --val-split",
    ),
    (
        "unknown checkpoint name",
        None,
        "evaluate --run tiny --checkpoint newest",
        2,
        "Error: unknown checkpoint 'newest'; choose one of: last, best",
    ),
    ("gradcam before train", "empty_run", "gradcam --run fresh", 1, "Error: run 'fresh' has no checkpoint"),
    ("sanity before train", "empty_run", "sanity --run fresh", 1, "Error: run 'fresh' has no checkpoint"),
    (
        "unknown CAM method",
        None,
        "gradcam --run tiny --method gradcam --method magiccam",
        2,
        "Error: unknown CAM method 'magiccam'; choose one of: gradcam, gradcam++, xgradcam, layercam, hirescam, scorecam, eigencam, guided-backprop, guided-gradcam",
    ),
    (
        "unknown --target",
        None,
        "gradcam --run tiny --target zebra",
        2,
        "Error: --target 'zebra' is not pred, true, both, a class name or a class index 0-9; classes: class0, class1, class2, class3, class4, class5, class6, class7, class8, class9",
    ),
    (
        "--batch-size 0",
        None,
        "gradcam --run tiny --batch-size 0",
        2,
        "Error: --batch-size and --steps must be at least 1",
    ),
    (
        "gradcam --precision fp8",
        None,
        "gradcam --run tiny --precision fp8",
        2,
        "Error: --precision 'fp8' is not one of: fp32, bf16, auto",
    ),
    ("sanity --count 1", None, "sanity --run tiny --count 1", 2, "Error: --count must be at least 2"),
    (
        "sanity --count larger than the test set",
        None,
        "sanity --run tiny --count 5000",
        2,
        "Error: --count 5000 is larger than the 200 test images",
    ),
    (
        "sanity unknown layer",
        None,
        "sanity --run tiny --layer layer4.9",
        2,
        "Error: unknown layer 'layer4.9'; top-level layers are: conv1, bn1, relu, layer1, layer2, layer3, layer4, linear (dotted names like layer4.1.conv2 reach inside them); did you mean 'layer4.1'?",
    ),
    ("plot before train", "empty_run", "plot --run fresh", 1, "Error: run 'fresh' has no metrics.json"),
    *(
        (
            f"{command} after the test images changed",
            "run:other_test_images",
            f"{command} --run tiny",
            1,
            "Error: the test images at '{tree0}' have changed since run 'tiny' was trained (same classes, other pixels or labels): its results would not be comparable",
        )
        for command in ("evaluate", "misclassified", "gradcam")
    ),
    (
        "a config.json field edited to a wrong type",
        "run:config_width_text",
        "evaluate --run tiny",
        1,
        "Error: '{runs}/tiny/config.json' is not a valid cifarcam config: invalid value for 'width': Input should be a valid integer, unable to parse string as an integer (got 'wide')",
    ),
    (
        "corrupt config.json in a run",
        "run:bad_config",
        "evaluate --run tiny",
        1,
        "Error: '{runs}/tiny/config.json' is not valid JSON",
    ),
    (
        "retrain a finished run",
        None,
        "train --run tiny --data {tree}",
        1,
        "Error: run 'tiny' already has a training (status: finished)",
    ),
    (
        "--resume with other options",
        None,
        "train --run tiny --resume --epochs 5",
        2,
        "Error: --resume continues with the run's own config; these differ from it: --epochs 5 (the run has --epochs 2)",
    ),
    (
        "--resume with a --no- option",
        None,
        "train --run tiny --resume --no-nesterov --width 8 --data {tree}",
        2,
        "Error: --resume continues with the run's own config; these differ from it: "
        '--data "{tree}" (the run has --data "{tree0}"); --no-nesterov (the run has --nesterov)',
    ),
    (
        "--resume with --overwrite",
        None,
        "train --run tiny --resume --overwrite",
        2,
        "Error: --resume continues a run and --overwrite replaces it; give one",
    ),
    (
        "--resume of a missing run",
        None,
        "train --run ghost --resume",
        1,
        "Error: run 'ghost' does not exist in '{runs}'",
    ),
    (
        "--resume from a corrupt state",
        "run:corrupt_state",
        "train --run tiny --resume",
        1,
        "Error: training state '{runs}/tiny/checkpoints/state.safetensors' is corrupt or truncated",
    ),
    (
        "runs directory is a file",
        "runs_is_file",
        "train --run r --data {tree} --runs-dir {tmp}/file",
        1,
        "Error: cannot use runs directory '{tmp}/file': File exists",
    ),
    ("report of a missing run", None, "report --run nope", 1, "Error: run 'nope' does not exist in '{runs}'"),
    ("report before train", "empty_run", "report --run fresh", 1, "Error: run 'fresh' has no metrics.json"),
    (
        "report of a corrupt evaluation.json",
        "run:bad_evaluation",
        "report --run tiny",
        1,
        "Error: '{runs}/tiny/evaluation.json' is not valid JSON",
    ),
    ("compare one run", None, "compare tiny", 2, "Error: compare needs at least 2 runs (got 1)"),
    ("compare a run twice", None, "compare tiny tiny", 2, "Error: run 'tiny' is given more than once"),
    ("compare a missing run", None, "compare tiny nope", 1, "Error: run 'nope' does not exist in '{runs}'"),
    (
        "compare an untrained run",
        "empty_run",
        "compare tiny fresh",
        1,
        "Error: run 'fresh' has no metrics.json",
    ),
    (
        "compare --out not .html",
        "second_run",
        "compare tiny other --out {tmp}/c.png",
        2,
        "Error: --out must name an .html file (got '{tmp}/c.png'); the PNG is written next to it",
    ),
    (
        "compare --out under a file",
        "second_run",
        "compare tiny other --out {tmp}/file/c.html",
        1,
        "Error: cannot write '{tmp}/file/c.html': File exists ('{tmp}/file')",
    ),
    (
        "compare --out inside a run",
        "second_run",
        "compare tiny other --out {runs}/other/misclassified.html",
        2,
        "Error: --out '{runs}/other/misclassified.html' is inside run 'other'; compare never writes into a run",
    ),
    (
        "compare next to a folder named like its PNG",
        "png_folder",
        "compare tiny other --out {tmp}/c.html",
        1,
        "Error: cannot write '{tmp}/c.png': Is a directory",
    ),
    (
        "--runs-dir inside a run",
        None,
        "train --run x --data {tree} --runs-dir {runs}/tiny --width 4 --epochs 1",
        2,
        "Error: the runs directory '{runs}/tiny' is inside run 'tiny' ('{runs}/tiny'); a run never holds another run",
    ),
    (
        "config width true",
        'file:{"width": true}',
        "train --run r --data {tree} --config {tmp}/c.json",
        2,
        "Error: invalid value for 'width': true/false is not a value this field takes (got True)",
    ),
    (
        "train over a run that lost meta.json and its checkpoint",
        "run:lost_meta_and_checkpoint",
        "train --run tiny --data {tree} --width 4 --epochs 1",
        1,
        "Error: run 'tiny' already has a training (status: unknown)",
    ),
    (
        "predict --out under a file",
        "runs_is_file",
        "predict --run tiny --cam --out {tmp}/file/sub {tmp}/file",
        2,
        "Error: --out '{tmp}/file/sub' cannot be a folder: '{tmp}/file' is a file",
    ),
    (
        "--target a digit that is not ASCII",
        None,
        "gradcam --run tiny --target ²",
        2,
        "Error: --target '²' is not pred, true, both, a class name or a class index 0-9",
    ),
    (
        "unknown preset",
        None,
        "train --run r --preset turbo",
        2,
        "Error: unknown preset 'turbo'; choose one of: quick, seed-albumentations",
    ),
    (
        "predict a non-image file",
        "file:{",
        "predict --run tiny {tmp}/c.json",
        1,
        "Error: '{tmp}/c.json' is not a readable image",
    ),
    (
        "predict --top-k 0",
        "file:{",
        "predict --run tiny --top-k 0 {tmp}/c.json",
        2,
        "Error: --top-k must be between 1 and 10 (got 0)",
    ),
    (
        "predict --out inside the run",
        "file:{",
        "predict --run tiny --cam --out {runs}/tiny/cams {tmp}/c.json",
        2,
        "Error: --out '{runs}/tiny/cams' is inside run 'tiny'; predictions never write into a run",
    ),
    (
        "compare --out inside a run of another runs directory",
        "second_run",
        "compare tiny other --out {tmp}/elsewhere/tiny/misclassified.html",
        2,
        "Error: --out '{tmp}/elsewhere/tiny/misclassified.html' is inside run 'tiny'; compare never writes into a run",
    ),
    (
        "predict --out inside a run of another runs directory",
        "second_run",
        "predict --run tiny --cam --out {tmp}/elsewhere/tiny/gradcam {tmp}/file",
        2,
        "Error: --out '{tmp}/elsewhere/tiny/gradcam' is inside run 'tiny'; predictions never write into a run",
    ),
    (
        "predict --out inside another run",
        "second_run",
        "predict --run tiny --cam --out {runs}/other/gradcam {tmp}/file",
        2,
        "Error: --out '{runs}/other/gradcam' is inside run 'other'; predictions never write into a run",
    ),
    (
        "sanity guided-backprop with an unknown layer",
        None,
        "sanity --run tiny --method guided-backprop --layer nonsense",
        2,
        "Error: unknown layer 'nonsense'; top-level layers are:",
    ),
    (
        "gradcam --steps beyond the pixels",
        None,
        "gradcam --run tiny --metrics --steps 1025",
        2,
        "Error: --steps must be at most 1024, one per pixel of a 32x32 image (got 1025)",
    ),
    (
        "the classifier as a CAM layer",
        None,
        "gradcam --run tiny --layer linear",
        2,
        "Error: layer 'linear' is the classifier: its output has no spatial map to explain",
    ),
    (
        "resume without a training state",
        "run:no_state",
        "train --run tiny --resume",
        1,
        "Error: run 'tiny' has trained epochs but no training state to resume from",
    ),
    (
        "resume after config.json was edited",
        "run:other_width",
        "train --run tiny --resume",
        1,
        "Error: run 'tiny' config.json has changed since its training state was saved: width 8 then, 16 now",
    ),
    (
        "--overwrite with a pipeline that resizes",
        "file:" + RESIZING_PIPELINE,
        "train --run tiny --overwrite --data {tree} --config {tmp}/c.json",
        2,
        "Error: invalid value for 'albumentations': the albumentations pipeline must keep 32x32x3 uint8 images (it made (64, 64, 3) uint8)",
    ),
    (
        "a pipeline parameter of the wrong type",
        "file:" + pipeline_file([A.HorizontalFlip()], {"p": "half"}),
        "train --run new --data {tree} --config {tmp}/c.json",
        2,
        "Error: invalid value for 'albumentations': not an albumentations pipeline (parameter 'p': Input should be a valid number, unable to parse string as a number (got 'half'))",
    ),
    *(
        (
            f"{command} of an invalid run name",
            None,
            f"{command} --run ../x",
            2,
            "Error: invalid run name '../x'",
        )
        for command in ("misclassified", "gradcam", "sanity")
    ),
    (
        "unknown device",
        None,
        "evaluate --run tiny --device gpu",
        2,
        "Error: --device 'gpu' is not one of: auto, cpu, cuda",
    ),
    (
        "sanity seed beyond 64 bits",
        None,
        "sanity --run tiny --seed 99999999999999999999",
        2,
        "Error: --seed must be between 0 and 9223372036854775743 (got 99999999999999999999)",
    ),
    (
        "config file that is not text",
        "binary_file",
        "train --run r --data {tree} --config {tmp}/c.json",
        2,
        "Error: config file '{tmp}/c.json' is not UTF-8 text (JSON is expected)",
    ),
]
if not torch.cuda.is_available():
    CASES.append(
        (
            "--device cuda without a GPU",
            None,
            "train --run r --data {tree} --device cuda",
            2,
            "Error: --device cuda was asked for, but no CUDA GPU is available",
        )
    )


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(("case", "prepare", "args", "code", "line"), CASES, ids=[c[0] for c in CASES])
def test_bad_input(
    case: str,
    prepare: str | None,
    args: str,
    code: int,
    line: str,
    tmp_path: Path,
    trained_runs: Path,
    synthetic_tree: Path,
) -> None:
    runs = copy_tree(trained_runs, tmp_path / "runs")
    tree = copy_tree(synthetic_tree, tmp_path / "tree")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    kind, _, detail = (prepare or "").partition(":")
    if kind == "run":
        damage_run(runs / "tiny", detail)
    elif kind == "tree":
        damage_tree(tree, detail)
    elif kind == "file":
        (scratch / "c.json").write_text(detail)
    elif kind == "binary_file":
        (scratch / "c.json").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    elif kind == "empty_run":
        (runs / "fresh").mkdir()
    elif kind == "runs_is_file":
        (scratch / "file").write_text("")
    elif kind == "second_run":
        copy_tree(runs / "tiny", runs / "other")
        (scratch / "file").write_text("")
        copy_tree(runs / "tiny", scratch / "elsewhere" / "tiny")  # a run of another runs directory
    elif kind == "png_folder":
        copy_tree(runs / "tiny", runs / "other")
        (scratch / "c.png").mkdir()
    before = snapshot(runs)
    values = {"runs": runs, "tree": tree, "tmp": scratch, "tree0": synthetic_tree}
    argv = [part.format(**values) for part in args.split()]
    if "--runs-dir" not in argv:
        argv += ["--runs-dir", str(runs)]
    result = runner.invoke(app, argv)
    assert "Traceback" not in result.output
    assert result.exit_code == code, result.output
    first = result.stderr.splitlines()[0]
    assert first.startswith(line.format(**values)), first
    assert len(result.stderr.splitlines()) <= 2, result.stderr  # the error, and a hint at most
    if prepare == "png_folder":  # the page and its figure are written together or not at all
        assert not (scratch / "c.html").exists()
    # No bad input changes or removes anything the runs root held; the only files it may add
    # are lock files and the test-set prediction cache.
    after = snapshot(runs)
    assert {k: after.get(k) for k in before} == before
    assert all(k.endswith((".lock", "predictions.safetensors")) for k in set(after) - set(before))


def test_a_run_being_trained_is_locked(trained_runs: Path, tmp_path: Path, synthetic_tree: Path) -> None:
    runs = copy_tree(trained_runs, tmp_path / "runs")
    with RunDir(runs, "busy").lock():
        result = runner.invoke(
            app, ["train", "--run", "busy", "--runs-dir", str(runs), "--data", str(synthetic_tree)]
        )
    assert result.exit_code == 1
    assert result.stderr.splitlines()[0].startswith(
        "Error: run 'busy' is being trained by another process (pid "
    )


def test_a_stale_lock_is_taken_over(tmp_path: Path, synthetic_tree: Path) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / ".r.lock").write_text("999999")  # left by a process that died: nobody holds the flock
    result = runner.invoke(
        app,
        tiny_train_args(runs, synthetic_tree, epochs=1),
    )
    assert result.exit_code == 0, result.output
    assert json.loads((runs / "r" / "meta.json").read_text())["status"] == "finished"


def test_a_failed_write_keeps_the_previous_checkpoint(
    tmp_path: Path, synthetic_tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Disk full while saving epoch 2: epoch 1's files survive whole, no temporary file is left."""
    import cifarcam.runs.files as fileio

    runs = tmp_path / "runs"
    real_fsync = fileio.os.fsync
    calls = {"n": 0}

    def fsync(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] > 7:  # config, meta, then state/last/logits/metrics.json/.csv of epoch 1 succeed
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(fileio.os, "fsync", fsync)
    result = runner.invoke(
        app,
        tiny_train_args(runs, synthetic_tree, epochs=3),
    )
    monkeypatch.setattr(fileio.os, "fsync", real_fsync)
    assert result.exit_code == 1
    assert result.stderr.splitlines()[0].startswith("Error: No space left on device")
    run = RunDir(runs, "r")
    _, info = run.load_model("last")
    assert info.epoch == 1
    assert [e["epoch"] for e in json.loads(run.metrics_path.read_text())["epochs"]] == [1]
    assert not list(run.path.rglob("*.tmp"))


def test_a_failed_save_is_not_counted_as_a_completed_epoch(
    tmp_path: Path, synthetic_tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The state of epoch 2 cannot be written (a full disk): meta.json says one epoch completed,
    as the run's files hold, not the two the training loop had reached."""
    runs = tmp_path / "runs"
    real_save_state = RunDir.save_state
    calls = {"n": 0}

    def save_state(self: RunDir, tensors: dict[str, torch.Tensor], meta: dict[str, object]) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        real_save_state(self, tensors, meta)

    monkeypatch.setattr(RunDir, "save_state", save_state)
    result = runner.invoke(app, tiny_train_args(runs, synthetic_tree, epochs=3))
    assert result.exit_code == 1, result.output
    assert result.stderr.splitlines()[0] == "Error: No space left on device"
    meta = json.loads((runs / "r" / "meta.json").read_text())
    assert (meta["status"], meta["completed_epochs"]) == ("failed", 1)
    assert [e["epoch"] for e in json.loads((runs / "r" / "metrics.json").read_text())["epochs"]] == [1]
