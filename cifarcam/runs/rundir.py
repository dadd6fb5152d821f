"""The run directory: its paths, JSON records, status and checkpoints. Its layout is the contract
between commands: config.json, meta.json, metrics.json/.csv, evaluation.json,
misclassified.json/.png, label_issues.json/.png, checkpoints/{last,best,state}.safetensors,
predictions.safetensors, plots/*.png, gradcam/ (named by explain/stored_maps.py),
sanity/*.{json,png}, report.html, tensorboard/, export/; every file but TensorBoard's append-only event
files is written atomically."""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
import re
import shutil
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

from safetensors import SafetensorError, safe_open

from cifarcam.errors import CheckpointError, RunError, RunLocked, UsageError
from cifarcam.runs import locks
from cifarcam.runs.files import atomic_write_files, atomic_write_json, json_bytes
from cifarcam.runs.formats import (
    CheckpointInfo,
    checkpoint_info,
    checkpoint_metadata,
    state_metadata,
    state_record,
)

P = ParamSpec("P")
T = TypeVar("T")

if TYPE_CHECKING:  # torch is imported where tensors are read or written: `plot` runs without it
    import torch
    from torch import nn

_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
CHECKPOINT_KINDS = ("last", "best")
# What reading a truncated, corrupt or foreign safetensors file (or its header) may raise.
_UNREADABLE = (SafetensorError, OSError, ValueError, KeyError, TypeError)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def validate_run_name(name: str) -> str:
    """Run names are one plain path component, so a run never writes outside the runs root."""
    if not _RUN_NAME.fullmatch(name) or ".." in name:
        raise UsageError(
            f"invalid run name {name!r}: use letters, digits, '.', '_' and '-' "
            "(starting with a letter or digit, no '..', at most 100 characters)"
        )
    return name


class RunDir:
    def __init__(self, runs_dir: Path, name: str) -> None:
        self.name = validate_run_name(name)
        self.runs_dir = runs_dir
        self.path = runs_dir / name
        self.config_path = self.path / "config.json"
        self.meta_path = self.path / "meta.json"
        self.metrics_path = self.path / "metrics.json"
        self.metrics_csv = self.path / "metrics.csv"
        self.evaluation_path = self.path / "evaluation.json"
        self.misclassified_json = self.path / "misclassified.json"
        self.misclassified_png = self.path / "misclassified.png"
        self.label_issues_json = self.path / "label_issues.json"
        self.label_issues_png = self.path / "label_issues.png"
        self.checkpoints_dir = self.path / "checkpoints"
        self.state_path = self.checkpoints_dir / "state.safetensors"
        self.gradcam_dir = self.path / "gradcam"
        self.faithfulness_path = self.gradcam_dir / "metrics.json"
        self.predictions_path = self.path / "predictions.safetensors"
        self.plots_dir = self.path / "plots"
        self.sanity_dir = self.path / "sanity"
        self.tensorboard_dir = self.path / "tensorboard"
        self.export_dir = self.path / "export"
        self.report_path = self.path / "report.html"
        self._readers_lock_path = runs_dir / f".{name}.readers.lock"

    def require(self) -> RunDir:
        if not self.path.is_dir():
            raise RunError(
                f"run '{self.name}' does not exist in '{self.runs_dir}'",
                hint=f"run 'cifarcam train --run {self.name}' first",
            )
        return self

    def has_training(self) -> bool:
        """Whether any record of a training is here (not a config.json: users write theirs first)."""
        records = (self.meta_path, self.metrics_path, self.checkpoint_path("last"), self.state_path)
        return any(path.exists() for path in records)

    def refuse_nesting(self) -> None:
        """A run is never made inside another run, nor around one: `train --overwrite` of the
        outer run would delete the inner one, and the inner one's files would mix into the outer."""
        outer = enclosing_run(self.runs_dir)
        if outer is not None:
            raise UsageError(
                f"the runs directory '{self.runs_dir}' is inside run '{outer.name}' ('{outer}'); "
                "a run never holds another run",
                hint="choose a --runs-dir outside every run",
            )
        folders = self.path.rglob("*") if self.path.is_dir() else iter(())
        inner = next((f for f in folders if f.is_dir() and looks_like_run(f)), None)
        if inner is not None:
            raise UsageError(
                f"'{self.path}' holds another run ('{inner}'); a run never holds another run",
                hint="choose another --run name, or move that run out first",
            )

    def start_training(self, overwrite: bool) -> None:
        """Create the run directory, refusing to replace earlier training unless asked to."""
        if self.has_training():
            if not overwrite:
                status = self.read_meta().get("status", "unknown") if self.meta_path.exists() else "unknown"
                raise RunError(
                    f"run '{self.name}' already has a training (status: {status})",
                    hint="pass --overwrite to replace it, or choose another --run name",
                )
            with locks.readers_shut_out(self._readers_lock_path) as alone:
                if not alone:
                    raise RunLocked(
                        f"run '{self.name}' is being read by another cifarcam command, which would "
                        f"write its results into the new run; run '{self.name}' was not changed",
                        hint="wait for that command to finish, then train again",
                    )
                shutil.rmtree(self.path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise RunError(f"cannot create run directory '{self.path}': {error.strerror}") from None

    def write_json(self, path: Path, value: Any) -> None:
        atomic_write_json(path, value)

    def read_json(self, path: Path) -> Any:
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RunError(f"run '{self.name}' has no {path.name}") from None
        except OSError as error:
            raise RunError(f"cannot read '{path}': {error.strerror or error}") from None
        except ValueError as error:  # also a file that is not UTF-8 text
            raise RunError(f"'{path}' is not valid JSON ({error})") from None

    def read_meta(self) -> dict[str, Any]:
        return self.read_json(self.meta_path)

    def read_epochs(self) -> list[dict[str, Any]]:
        """The per-epoch records of metrics.json; a RunError when the run has none yet."""
        self.require()
        if not self.metrics_path.exists():
            raise RunError(
                f"run '{self.name}' has no metrics.json", hint=f"run 'cifarcam train --run {self.name}' first"
            )
        return self.read_json(self.metrics_path)["epochs"]  # `train` writes it once an epoch is done

    def write_metrics(self, epochs: list[dict[str, Any]]) -> None:
        """metrics.json and metrics.csv (a row per epoch, the same fields), replaced together."""
        table = io.StringIO()
        writer = csv.DictWriter(table, fieldnames=list(dict.fromkeys(k for e in epochs for k in e)))
        writer.writeheader()
        writer.writerows(epochs)
        atomic_write_files(
            {self.metrics_path: json_bytes({"epochs": epochs}), self.metrics_csv: table.getvalue().encode()}
        )

    def update_meta(self, **fields: Any) -> dict[str, Any]:
        meta = self.read_meta() if self.meta_path.exists() else {}
        meta.update(fields)
        self.write_json(self.meta_path, meta)
        return meta

    def lock(self) -> contextlib.AbstractContextManager[None]:
        """The one `train` of this run (an exclusive lock for the block)."""
        return locks.training(self.runs_dir, self.name)

    def reading(self) -> contextlib.AbstractContextManager[None]:
        """Keep this run from being deleted by `train --overwrite` for the block."""
        return locks.reading(self.path, self._readers_lock_path)

    def merging(self) -> contextlib.AbstractContextManager[bool]:
        """One command at a time merges its results into this run's files (`locks.merging`)."""
        return locks.merging(self.runs_dir / f".{self.name}.results.lock")

    def remove_temporaries(self) -> None:
        """Delete temporary files a killed writer left (holding the lock); none while another
        command reads the run: they may be its files in flight."""
        with locks.readers_shut_out(self._readers_lock_path) as alone:
            if alone:
                for leftover in self.path.rglob(".*.tmp"):
                    leftover.unlink(missing_ok=True)

    def save_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        write_safetensors(self.state_path, tensors, state_metadata(meta))

    def load_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """The saved training state, or None when no epoch has been saved yet."""
        if not self.state_path.exists():
            return None
        try:
            tensors, metadata = read_safetensors(self.state_path)
            return tensors, state_record(metadata)
        except _UNREADABLE as error:
            raise CheckpointError(
                f"training state '{self.state_path}' is corrupt or truncated ({error})"
            ) from None

    def read_state_meta(self) -> dict[str, Any] | None:
        """The training state's record from the file's header alone; None when there is none or it
        cannot be read (`load_state` reports that)."""
        try:
            with safe_open(str(self.state_path), framework="pt") as state:
                return state_record(state.metadata() or {})
        except _UNREADABLE:
            return None

    def checkpoint_path(self, kind: str) -> Path:
        return self.checkpoints_dir / f"{kind}.safetensors"

    def save_checkpoint(self, kind: str, model: nn.Module, info: dict[str, Any]) -> str:
        """Write the model's weights and `info`; returns the new checkpoint's id."""
        tensors = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
        checkpoint_id = uuid.uuid4().hex
        write_safetensors(self.checkpoint_path(kind), tensors, checkpoint_metadata(info, checkpoint_id))
        return checkpoint_id

    def save_test_logits(self, logits: torch.Tensor, checkpoint_id: str, test_fingerprint: str) -> None:
        """Keep a checkpoint's float32 logits (N, classes) on a test set (`Split.fingerprint`)."""
        tensors = {"logits": logits.detach().float().cpu().contiguous()}
        metadata = {"checkpoint_id": checkpoint_id, "test_fingerprint": test_fingerprint}
        write_safetensors(self.predictions_path, tensors, metadata)

    def read_test_logits(self, checkpoint_id: str, test_fingerprint: str) -> torch.Tensor | None:
        """The cached test-set logits if they are this checkpoint's on this test set; else None
        (also for a missing or unreadable cache, which the next `save_test_logits` replaces)."""
        try:
            tensors, metadata = read_safetensors(self.predictions_path)
        except _UNREADABLE:
            return None
        wanted = {"checkpoint_id": checkpoint_id, "test_fingerprint": test_fingerprint}
        return tensors["logits"] if metadata == wanted else None

    def load_model(self, kind: str = "last") -> tuple[nn.Module, CheckpointInfo]:
        """Rebuild the model from the checkpoint file alone."""
        if kind not in CHECKPOINT_KINDS:
            raise UsageError(f"unknown checkpoint '{kind}'; choose one of: {', '.join(CHECKPOINT_KINDS)}")
        self.require()
        path = self.checkpoint_path(kind)
        if not path.exists():
            if kind == "best":
                raise RunError(
                    f"run '{self.name}' has no best checkpoint (it is kept only with --val-split)",
                    hint="use --checkpoint last",
                )
            raise RunError(
                f"run '{self.name}' has no checkpoint",
                hint=f"run 'cifarcam train --run {self.name}' first",
            )
        from cifarcam.models.resnet import build_model

        try:
            tensors, metadata = read_safetensors(path)
            info = checkpoint_info(kind, metadata)
        except _UNREADABLE as error:
            raise CheckpointError(f"checkpoint '{path}' is corrupt or truncated ({error})") from None
        model = build_model(info.model, info.width, info.num_classes, info.norm)
        model.load_state_dict(tensors, strict=True)
        return model, info


def reads_run(function: Callable[Concatenate[RunDir, P], T]) -> Callable[Concatenate[RunDir, P], T]:
    """`function(run, ...)` holding `run.reading()`: for commands that write results into a run."""

    @functools.wraps(function)
    def holding(run: RunDir, /, *args: P.args, **kwargs: P.kwargs) -> T:
        with run.reading():
            return function(run, *args, **kwargs)

    return holding


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as opened:
        return {name: opened.get_tensor(name) for name in opened.keys()}, opened.metadata() or {}  # noqa: SIM118


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save

    atomic_write_files({path: save(tensors, metadata=metadata)})


def looks_like_run(folder: Path) -> bool:
    """A checkpoint, a training state, or a meta.json naming the cifarcam version: a project
    folder with a meta.json and a config.json of its own is not a run."""
    checkpoints = folder / "checkpoints"
    if any((checkpoints / f"{kind}.safetensors").is_file() for kind in (*CHECKPOINT_KINDS, "state")):
        return True
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "cifarcam_version" in meta


def enclosing_run(path: Path) -> Path | None:
    """The nearest of `path` and its parents that `looks_like_run`, in any runs directory: commands
    that write elsewhere refuse it, or the run's report would show what they wrote as its own."""
    target = path.resolve()
    return next((folder for folder in (target, *target.parents) if looks_like_run(folder)), None)
