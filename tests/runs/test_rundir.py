import json
import os
from pathlib import Path

import pytest
import torch
from conftest import disk_full_at_fsync

from cifarcam.data.datasets import Split, synthetic_dataset
from cifarcam.errors import CheckpointError, RunError, UsageError
from cifarcam.evaluation.inference import score
from cifarcam.evaluation.loading import load_run
from cifarcam.models.resnet import build_model
from cifarcam.runs.files import atomic_open, atomic_write_files, atomic_write_json, written_file
from cifarcam.runs.rundir import RunDir, validate_run_name

HEADER = {
    "model": "resnet18",
    "width": 8,
    "norm": "batch",
    "num_classes": 10,
    "classes": [str(i) for i in range(10)],
    "mean": [0.5] * 3,
    "std": [0.25] * 3,
    "epoch": 3,
}


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "m.json"
    atomic_write_json(target, {"a": 1})
    atomic_write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert os.listdir(tmp_path) == ["m.json"]


def test_failed_write_keeps_the_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "m.json"
    atomic_write_json(target, {"good": True})
    with pytest.raises(RuntimeError), atomic_open(target) as handle:
        handle.write(b'{"half": ')
        raise RuntimeError("disk full")
    assert json.loads(target.read_text()) == {"good": True}
    assert os.listdir(tmp_path) == ["m.json"]


def test_files_written_together_all_stay_as_they_were_when_one_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk error on the second file: the first is not replaced either, and no temporary is left."""
    first, second = tmp_path / "a.png", tmp_path / "a.json"
    atomic_write_files({first: b"old png", second: b"old json"})
    disk_full_at_fsync(2, monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_files({first: b"new png", second: b"new json"})
    assert (first.read_bytes(), second.read_bytes()) == (b"old png", b"old json")
    assert sorted(os.listdir(tmp_path)) == ["a.json", "a.png"]
    atomic_write_files({first: b"new png", second: b"new json"})  # the third and fourth fsync
    assert (first.read_bytes(), second.read_bytes()) == (b"new png", b"new json")


def test_a_folder_in_the_way_is_found_before_anything_is_written(tmp_path: Path) -> None:
    page, figure = tmp_path / "c.html", tmp_path / "c.png"
    figure.mkdir()
    with pytest.raises(IsADirectoryError):
        atomic_write_files({page: b"<html>", figure: b"png"})
    assert sorted(os.listdir(tmp_path)) == ["c.png"]


def test_errors_name_the_file_a_temporary_was_for(tmp_path: Path) -> None:
    assert written_file(str(tmp_path / ".loss.png.0123abcd.tmp")) == str(tmp_path / "loss.png")
    assert written_file(str(tmp_path / "loss.png")) == str(tmp_path / "loss.png")
    assert written_file(str(tmp_path / ".hidden.tmp")) == str(tmp_path / ".hidden.tmp")


def test_a_run_is_never_made_inside_another_nor_around_one(runs_dir: Path) -> None:
    outer = RunDir(runs_dir, "outer")
    outer.start_training(overwrite=False)
    atomic_write_json(outer.meta_path, {"status": "finished", "cifarcam_version": "0"})
    for inner_root in (outer.path, outer.checkpoints_dir / "deeper"):
        with pytest.raises(UsageError, match="is inside run 'outer'"):
            RunDir(inner_root, "inner").refuse_nesting()
    RunDir(runs_dir, "beside").refuse_nesting()  # a sibling is fine
    inner = RunDir(runs_dir / "later" / "sub", "inner")
    inner.start_training(overwrite=False)
    inner.save_checkpoint("last", build_model("resnet18", 4), HEADER | {"width": 4})
    with pytest.raises(UsageError, match="holds another run"):
        RunDir(runs_dir, "later").refuse_nesting()


def test_a_project_folder_with_its_own_meta_and_config_is_not_a_run(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "meta.json").write_text("{}")
    (project / "config.json").write_text('{"lr": 0.1}')
    RunDir(project / "runs", "r").refuse_nesting()


def test_a_config_file_put_in_the_run_folder_first_is_not_a_training(runs_dir: Path) -> None:
    run = RunDir(runs_dir, "r")
    run.path.mkdir()
    atomic_write_json(run.config_path, {"width": 8})
    assert not run.has_training()
    run.start_training(overwrite=False)
    assert run.config_path.exists()
    for record in (run.meta_path, run.metrics_path, run.checkpoint_path("last"), run.state_path):
        record.parent.mkdir(exist_ok=True)
        record.write_text("{}")
        assert run.has_training()
        record.unlink()


def test_a_failed_rename_leaves_no_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cifarcam.runs.files as fileio

    real_replace = fileio.os.replace
    calls = {"n": 0}

    def replace(source: str, target: str) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise PermissionError(13, "Permission denied", target)
        real_replace(source, target)

    monkeypatch.setattr(fileio.os, "replace", replace)
    with pytest.raises(PermissionError):
        atomic_write_files({tmp_path / "a.png": b"png", tmp_path / "a.json": b"json"})
    assert sorted(os.listdir(tmp_path)) == ["a.png"]  # renamed before the failure; no temporary


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", ".hidden", "", "x" * 101, "a b", "/abs"])
def test_run_names_cannot_escape_the_runs_root(name: str) -> None:
    with pytest.raises(UsageError, match="invalid run name"):
        validate_run_name(name)


def test_checkpoint_round_trip_is_bit_identical(runs_dir: Path) -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", 8)
    model(torch.randn(4, 3, 32, 32))  # update BN running stats so they are not defaults
    run = RunDir(runs_dir, "r")
    run.save_checkpoint("last", model, HEADER)
    loaded, info = run.load_model("last")
    assert (info.model, info.width, info.epoch, info.mean) == ("resnet18", 8, 3, (0.5, 0.5, 0.5))
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)


def test_cached_test_logits_belong_to_one_checkpoint_and_one_test_set(runs_dir: Path) -> None:
    run = RunDir(runs_dir, "r")
    run.path.mkdir(parents=True)
    test = synthetic_dataset(10, 5, seed=1).test
    assert run.read_test_logits("a", test.fingerprint()) is None  # nothing cached yet
    logits = torch.randn(5, 10)
    run.save_test_logits(logits, "a", test.fingerprint())
    cached = run.read_test_logits("a", test.fingerprint())
    assert cached is not None and torch.equal(cached, logits)
    assert run.read_test_logits("b", test.fingerprint()) is None  # another checkpoint's
    changed = Split(test.images.clone(), test.labels)
    changed.images[0, 0, 0, 0] ^= 1  # one pixel's lowest bit
    assert run.read_test_logits("a", changed.fingerprint()) is None  # another test set's
    relabelled = Split(test.images, test.labels.roll(1))
    assert run.read_test_logits("a", relabelled.fingerprint()) is None
    run.predictions_path.write_bytes(b"not safetensors")
    assert run.read_test_logits("a", test.fingerprint()) is None  # unreadable: recomputed and replaced


def test_training_caches_the_test_logits_of_its_last_checkpoint(trained_runs: Path) -> None:
    """What `train` scored at its last epoch is what the saved checkpoint scores: later commands
    take it from the cache instead of another pass over the test set."""
    run = RunDir(trained_runs, "tiny")
    loaded = load_run(run)
    cached = run.read_test_logits(loaded.info.checkpoint_id, loaded.test.fingerprint())
    assert cached is not None
    torch.testing.assert_close(cached, loaded.predict_test(), rtol=0, atol=1e-5)
    last = json.loads(run.metrics_path.read_text())["epochs"][-1]
    assert score(cached, loaded.test.labels.cpu()) == {"loss": last["test_loss"], "acc": last["test_acc"]}
    best = run.load_model("best")[1].checkpoint_id  # saved separately: not what the cache holds
    assert run.read_test_logits(best, loaded.test.fingerprint()) is None


def test_evaluate_scores_again_when_the_test_images_changed(
    trained_runs: Path, synthetic_tree: Path, tmp_path: Path
) -> None:
    """The same classes and image count, other images: the cached logits are not theirs."""
    from conftest import copy_tree, write_image_folder

    from cifarcam.evaluation.commands import evaluate

    runs = copy_tree(trained_runs, tmp_path / "runs")
    other = write_image_folder(synthetic_dataset(400, 200, seed=4), tmp_path / "other")
    run = RunDir(runs, "tiny")
    run.config_path.write_text(json.dumps(json.loads(run.config_path.read_text()) | {"data": str(other)}))
    result = evaluate(run, tta=False)
    loaded = load_run(run)
    expected = score(loaded.predict_test(), loaded.test.labels.cpu())
    assert (result["accuracy"], result["loss"]) == (expected["acc"], expected["loss"])
    last = json.loads(run.metrics_path.read_text())["epochs"][-1]
    assert result["loss"] != last["test_loss"]  # not the numbers of the tree it was trained on


def test_truncated_and_garbage_checkpoints_are_reported(runs_dir: Path) -> None:
    run = RunDir(runs_dir, "r")
    run.save_checkpoint("last", build_model("resnet18", 8), HEADER)
    path = run.checkpoint_path("last")
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="is corrupt or truncated"):
        run.load_model("last")
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="is corrupt or truncated"):
        run.load_model("last")


def test_missing_run_and_missing_checkpoints(runs_dir: Path) -> None:
    with pytest.raises(RunError, match="run 'nope' does not exist"):
        RunDir(runs_dir, "nope").load_model()
    (runs_dir / "empty").mkdir()
    with pytest.raises(RunError) as caught:
        RunDir(runs_dir, "empty").load_model()
    assert caught.value.message == "run 'empty' has no checkpoint"
    assert caught.value.hint == "run 'cifarcam train --run empty' first"
    with pytest.raises(RunError, match="no best checkpoint"):
        RunDir(runs_dir, "empty").load_model("best")


def test_start_training_refuses_to_replace_without_overwrite(runs_dir: Path) -> None:
    run = RunDir(runs_dir, "r")
    run.start_training(overwrite=False)
    run.update_meta(status="finished")
    with pytest.raises(RunError, match=r"already has a training \(status: finished\)"):
        run.start_training(overwrite=False)
    assert run.meta_path.exists()
    run.start_training(overwrite=True)
    assert not run.meta_path.exists()


def test_atomic_files_get_ordinary_permissions(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "m.json", {})
    finally:
        os.umask(old)
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o644


def test_a_class_without_test_images_has_no_accuracy(
    trained_runs: Path, synthetic_tree: Path, tmp_path: Path
) -> None:
    from conftest import copy_tree

    from cifarcam.evaluation.commands import evaluate

    runs = copy_tree(trained_runs, tmp_path / "runs")
    tree = copy_tree(synthetic_tree, tmp_path / "tree")
    for image in (tree / "test" / "class9").iterdir():
        image.unlink()  # the folder stays: the classes are the same
    run = RunDir(runs, "tiny")
    run.config_path.write_text(json.dumps(json.loads(run.config_path.read_text()) | {"data": str(tree)}))
    result = evaluate(run, tta=False)
    assert result["per_class_accuracy"]["class9"] is None  # not 0%: there was nothing to get wrong
    assert all(isinstance(result["per_class_accuracy"][f"class{i}"], float) for i in range(9))
    assert json.loads(run.evaluation_path.read_text())["per_class_accuracy"]["class9"] is None
