"""The `export` command: a run's checkpoint as model.onnx, checked against PyTorch on test
images, and MODEL_CARD.md beside it, written together."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

import cifarcam
from cifarcam.errors import UsageError
from cifarcam.evaluation.loading import load_run
from cifarcam.export.model_card import CardFacts, model_card
from cifarcam.export.onnx_model import Agreement, check_against_pytorch, require_extra, to_onnx
from cifarcam.runs.files import atomic_write_files
from cifarcam.runs.rundir import RunDir, enclosing_run, reads_run


@dataclass
class ExportOutcome:
    paths: list[Path]
    agreement: Agreement


@reads_run
def export(
    run: RunDir,
    checkpoint: str = "last",
    out: Path | None = None,
    check_images: int = 1000,
    device_name: str = "auto",
) -> ExportOutcome:
    """Write OUT/model.onnx and OUT/MODEL_CARD.md (OUT defaults to the run's export/ folder)."""
    out = out if out is not None else run.export_dir
    owner = enclosing_run(out)
    if owner is not None and owner != run.path.resolve():
        raise UsageError(f"--out '{out}' is inside run '{owner.name}'; export writes into its own run only")
    if check_images < 1:
        raise UsageError("--check-images must be at least 1")
    require_extra()
    loaded = load_run(run, checkpoint, device_name)
    info = loaded.info
    count = min(check_images, len(loaded.test))
    indices = torch.linspace(0, len(loaded.test) - 1, count).round().long()  # spread over the classes
    inputs = loaded.test_inputs(indices).cpu()
    metadata = {
        "cifarcam_version": cifarcam.__version__,
        "run": run.name,
        "checkpoint": checkpoint,
        "epoch": str(info.epoch),
        "classes": json.dumps(info.classes),
        "mean": json.dumps(list(info.mean)),
        "std": json.dumps(list(info.std)),
        "input": "float32 (N, 3, 32, 32): RGB in [0, 1], minus mean, divided by std, per channel",
    }
    onnx_model = to_onnx(loaded.model, metadata)
    agreement = check_against_pytorch(onnx_model, loaded.model, inputs)
    files = {out / "model.onnx": onnx_model}
    galleries = sorted(run.gradcam_dir.glob("*.png"))
    if galleries:
        files[out / "gradcam.png"] = galleries[0].read_bytes()
    sanity_checks = sorted(run.sanity_dir.glob("*.json"))
    facts = CardFacts(
        run=run.name,
        checkpoint=checkpoint,
        info=info,
        config=run.read_json(run.config_path),
        meta=run.read_meta(),
        epochs=run.read_epochs(),
        evaluation=run.read_json(run.evaluation_path) if run.evaluation_path.exists() else None,
        gallery="gradcam.png" if galleries else None,
        sanity=run.read_json(sanity_checks[0]) if sanity_checks else None,
        agreement=agreement,
    )
    files[out / "MODEL_CARD.md"] = model_card(facts).encode("utf-8")
    atomic_write_files(files)
    return ExportOutcome(list(files), agreement)
