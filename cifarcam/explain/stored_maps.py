"""The files `gradcam` writes: gradcam/<method>_<layer>[_all].safetensors (the mistakes' maps, or
the whole test set's), a gallery <methods>_<layers>.png/.json, and the faithfulness table metrics.json."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors

from cifarcam.devices import precision_name
from cifarcam.evaluation.loading import LoadedRun
from cifarcam.report import figures
from cifarcam.runs.files import json_bytes
from cifarcam.runs.rundir import RunDir

GUIDED = ("guided-backprop", "guided-gradcam")  # their results are input gradients, not maps


@dataclass
class Explanations:
    """Everything computed for a set of test images, on the CPU."""

    indices: torch.Tensor
    pred: torch.Tensor
    true: torch.Tensor
    # (target, method, layer): (N, H, W) maps, or (N, 3, H, W) attributions for the guided methods
    maps: dict[tuple[str, str, str], torch.Tensor] = field(default_factory=dict)


MAPS_NOTE = (
    "maps_<target>: (N, 32, 32) float32 in [0, 1]: ReLU, bilinear upsampling "
    "(align_corners=False), min-max per map; attributions_<target>: (N, 3, 32, 32) input gradients"
)

MAX_STEM = 120  # bytes of a gallery's file name from its methods and layers


def gallery_stem(methods: list[str], layers: list[str]) -> str:
    """'gradcam,scorecam_layer3,layer4'; a long list is cut and told apart by a digest of it,
    since file names have a length limit (255 bytes on most file systems)."""
    stem = f"{','.join(methods)}_{','.join(layers)}"
    if len(stem.encode()) <= MAX_STEM:
        return stem
    digest = hashlib.sha256(stem.encode()).hexdigest()[:10]
    return f"{stem.encode()[: MAX_STEM - 11].decode(errors='ignore')}-{digest}"


def maps_files(
    run: RunDir,
    explained: Explanations,
    targets: list[str],
    groups: list[tuple[str, str]],
    all_images: bool,
    loaded: LoadedRun,
    amp_dtype: torch.dtype | None,
) -> dict[Path, bytes]:
    """One safetensors file per (method, layer) group with the maps (attributions) of `targets`;
    the metadata names the checkpoint, test set and precision they came from."""
    files = {}
    for method, layer in groups:
        tensors = {name: getattr(explained, name).contiguous() for name in ("indices", "pred", "true")}
        kind = "attributions" if method in GUIDED else "maps"
        for key in targets:
            name = key.replace("class:", "class_")
            tensors[f"{kind}_{name}"] = explained.maps[(key, method, layer)].contiguous()
        metadata = {
            "method": method,
            "layer": layer,
            "targets": ",".join(targets),
            "epoch": str(loaded.info.epoch),
            "checkpoint_id": loaded.info.checkpoint_id,
            "test_fingerprint": loaded.test_fingerprint,
            # guided backpropagation never runs under autocast: its attributions are fp32's
            "precision": precision_name(None if method == "guided-backprop" else amp_dtype),
            "note": MAPS_NOTE,
        }
        stem = f"{method}_{layer}" if layer else method
        path = run.gradcam_dir / f"{stem}{'_all' if all_images else ''}.safetensors"
        files[path] = save_safetensors(tensors, metadata=metadata)
    return files


def target_heading(key: str, label_issue: bool) -> str:
    """What a gallery column explains: for an image whose label is a likely label error, the
    given label and the suggested one (the prediction) rather than a "true class"."""
    if label_issue and key in ("pred", "true"):
        return "suggested label" if key == "pred" else "given label"
    return {"pred": "pred class", "true": "true class"}.get(key, key.replace(":", " "))


def gallery_files(
    run: RunDir,
    loaded: LoadedRun,
    explained: Explanations,
    rows: torch.Tensor,
    targets: list[str],
    groups: list[tuple[str, str]],
    confidence: torch.Tensor,
    stem: str,
    checkpoint: str,
    label_issues: torch.Tensor | None = None,
) -> dict[Path, bytes]:
    """The gallery (PNG) of the mistakes in `rows` and its JSON: indices, classes, confidence.
    `label_issues` (a bool per explained image, None: not known) marks likely label errors: their
    rows are red, and their "true" and "pred" columns are headed "given label" and "suggested label"."""
    classes = loaded.info.classes
    indices = explained.indices[rows]
    pred_names = [classes[int(p)] for p in explained.pred[rows]]
    true_names = [classes[int(t)] for t in explained.true[rows]]
    marked = [False] * len(rows) if label_issues is None else label_issues[rows].tolist()
    columns = []
    for method, layer in groups:
        for key in targets:
            tiles = explained.maps[(key, method, layer)][rows].numpy()
            where = f"{method} {layer}".strip()
            headings = [f"{where}\n{target_heading(key, flag)}" for flag in marked]
            columns.append(figures.GalleryColumn(headings, tiles))
    labels = [
        f"#{int(i)} true: {t}\npred: {p} ({c:.0%})" + ("\nlikely label error" if flag else "")
        for i, t, p, c, flag in zip(
            indices, true_names, pred_names, confidence[rows].tolist(), marked, strict=True
        )
    ]
    methods = list(dict.fromkeys(m for m, _ in groups))
    title = (
        f"run {run.name}: {', '.join(methods)} for the {len(rows)} most confident mistakes "
        f"({checkpoint} checkpoint, epoch {loaded.info.epoch}; red = high; "
        "labels in red: likely label errors)"
    )
    record = {
        "title": title,
        "methods": methods,
        "layers": sorted({layer for _, layer in groups if layer}),
        "targets": targets,
        "checkpoint": checkpoint,
        "epoch": loaded.info.epoch,
        "indices": indices.tolist(),
        "true": true_names,
        "pred": pred_names,
        "confidence": confidence[rows].tolist(),
        "likely_label_issue": None if label_issues is None else marked,
    }
    gallery = figures.cam_gallery(loaded.test_display(indices), columns, labels, title, marked)
    return {
        run.gradcam_dir / f"{stem}.png": gallery,
        run.gradcam_dir / f"{stem}.json": json_bytes(record),
    }


_ROW_KEY = ("method", "layer", "target", "selection", "steps", "checkpoint", "precision")


def faithfulness_file(
    run: RunDir,
    rows: list[dict[str, Any]],
    selection: str,
    steps: int,
    checkpoint: str,
    precision: str,
) -> dict[Path, bytes]:
    """gradcam/metrics.json (path and bytes): rows from earlier calls are kept unless this call
    recomputed them: the same method, layer, target, images, steps, checkpoint and precision
    (each row names its own). Read and written under the run's `merging` lock."""
    path = run.faithfulness_path
    earlier = run.read_json(path)["results"] if path.exists() else []
    for row in rows:
        row |= {"selection": selection, "steps": steps, "checkpoint": checkpoint, "precision": precision}
    keys = {tuple(r[k] for k in _ROW_KEY) for r in rows}
    kept = [r for r in earlier if tuple(r.get(k) for k in _ROW_KEY) not in keys]
    document = {
        "about": "deletion_auc (lower is better) and insertion_auc (higher) over each row's "
        "`steps`, softmax probability of the target class, deletion to the mean colour, "
        "insertion from a Gaussian blur (sigma 4); average_drop (% , lower) and "
        "increase_in_confidence (% of images, higher) for the input multiplied by its map; "
        "'random' is a uniform-noise map baseline",
        "results": kept + rows,
    }
    return {path: json_bytes(document)}
