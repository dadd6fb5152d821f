"""The files `gradcam` writes into a run directory.

gradcam/<method>_<layer>.safetensors holds the maps of the mistakes, and
gradcam/<method>_<layer>_all.safetensors those of the whole test set (guided-backprop has no
layer); a later call for other targets of the same images keeps the earlier targets' maps.
gradcam/<methods>_<layers>.png/.json is a gallery, gradcam/metrics.json the faithfulness table,
whose rows from earlier calls stay unless a call recomputes them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors

from cifarcam.devices import precision_name
from cifarcam.errors import RunError
from cifarcam.evaluation.loading import LoadedRun
from cifarcam.report import figures
from cifarcam.runs.files import json_bytes
from cifarcam.runs.rundir import RunDir


@dataclass
class Explanations:
    """Everything computed for a set of test images, on the CPU."""

    indices: torch.Tensor
    pred: torch.Tensor
    true: torch.Tensor
    maps: dict[tuple[str, str, str], torch.Tensor] = field(default_factory=dict)  # (target, method, layer)
    attributions: dict[tuple[str, str, str], torch.Tensor] = field(default_factory=dict)

    def tensor(self, key: tuple[str, str, str]) -> torch.Tensor:
        """What was computed for (target, method, layer): from `attributions` where it holds the
        key (explain_images stores the guided methods there), else from `maps`."""
        return self.attributions[key] if key in self.attributions else self.maps[key]


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


def maps_path(run: RunDir, method: str, layer: str, all_images: bool) -> Path:
    """gradcam/METHOD_LAYER.safetensors for the mistakes, METHOD_LAYER_all.safetensors for the
    whole test set (guided-backprop has no layer), so neither selection replaces the other."""
    stem = f"{method}_{layer}" if layer else method
    return run.gradcam_dir / f"{stem}{'_all' if all_images else ''}.safetensors"


_TARGET_PREFIXES = ("maps_", "attributions_")


def _earlier_targets(
    path: Path, tensors: dict[str, torch.Tensor], same: dict[str, str]
) -> dict[str, torch.Tensor]:
    """The other targets' maps in an earlier file of the same images (indices and test set),
    checkpoint and precision: a call for one target keeps what a call for another computed."""
    try:
        with safe_open(path, "pt") as earlier:
            metadata = earlier.metadata() or {}
            if any(metadata.get(key) != value for key, value in same.items()):
                return {}
            if not torch.equal(earlier.get_tensor("indices"), tensors["indices"]):
                return {}
            stored = earlier.keys()  # a safe_open handle is not iterable itself
            names = [n for n in stored if n.startswith(_TARGET_PREFIXES) and n not in tensors]
            return {name: earlier.get_tensor(name) for name in names}
    except (OSError, SafetensorError):  # none yet, or unreadable: it is replaced
        return {}


def maps_files(
    run: RunDir,
    explained: Explanations,
    targets: list[str],
    groups: list[tuple[str, str]],
    all_images: bool,
    loaded: LoadedRun,
    amp_dtype: torch.dtype | None,
) -> dict[Path, bytes]:
    """One file (path and bytes) per (method, layer) group: the maps (attributions for the guided
    methods) of `targets`, plus other targets kept from an earlier file of the same images, checkpoint and
    precision; the metadata names the checkpoint, test set and precision they came from."""
    files = {}
    same = {"checkpoint_id": loaded.info.checkpoint_id, "test_fingerprint": loaded.test_fingerprint}
    for method, layer in groups:
        # guided backpropagation never runs under autocast: its attributions are fp32's
        same["precision"] = precision_name(None if method == "guided-backprop" else amp_dtype)
        tensors = {
            "indices": explained.indices.contiguous(),
            "pred": explained.pred.contiguous(),
            "true": explained.true.contiguous(),
        }
        for key in targets:
            name = key.replace("class:", "class_")
            kind = "attributions" if (key, method, layer) in explained.attributions else "maps"
            tensors[f"{kind}_{name}"] = explained.tensor((key, method, layer)).contiguous()
        path = maps_path(run, method, layer, all_images)
        tensors |= _earlier_targets(path, tensors, same)
        names = [
            n.split("_", 1)[1].replace("class_", "class:", 1)
            for n in tensors
            if n.startswith(_TARGET_PREFIXES)
        ]
        metadata = {
            "method": method,
            "layer": layer,
            "targets": ",".join(names),
            "epoch": str(loaded.info.epoch),
            **same,
            "note": MAPS_NOTE,
        }
        files[path] = save_safetensors(tensors, metadata=metadata)
    return files


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
) -> dict[Path, bytes]:
    """The gallery of the mistakes in `rows` (PNG) and its sidecar JSON: indices, classes,
    confidence (paths and bytes)."""
    classes = loaded.info.classes
    indices = explained.indices[rows]
    shown = loaded.test_display(indices)
    pred_names = [classes[int(p)] for p in explained.pred[rows]]
    true_names = [classes[int(t)] for t in explained.true[rows]]
    columns = []
    for method, layer in groups:
        for key in targets:
            tiles = explained.tensor((key, method, layer))[rows].numpy()
            where = f"{method} {layer}".strip()
            heading = {"pred": "pred class", "true": "true class"}.get(key, key.replace(":", " "))
            columns.append(figures.GalleryColumn(f"{where}\n{heading}", tiles))
    labels = [
        f"#{int(i)} true: {t}\npred: {p} ({c:.0%})"
        for i, t, p, c in zip(indices, true_names, pred_names, confidence[rows].tolist(), strict=True)
    ]
    title = (
        f"run {run.name}: {', '.join(dict.fromkeys(m for m, _ in groups))} for the {len(rows)} most "
        f"confident mistakes ({checkpoint} checkpoint, epoch {loaded.info.epoch}; red = high)"
    )
    png, sidecar = run.gradcam_dir / f"{stem}.png", run.gradcam_dir / f"{stem}.json"
    record = {
        "title": title,
        "methods": list(dict.fromkeys(m for m, _ in groups)),
        "layers": sorted({layer for _, layer in groups if layer}),
        "targets": targets,
        "checkpoint": checkpoint,
        "epoch": loaded.info.epoch,
        "indices": indices.tolist(),
        "true": true_names,
        "pred": pred_names,
        "confidence": confidence[rows].tolist(),
    }
    return {png: figures.cam_gallery(shown, columns, labels, title), sidecar: json_bytes(record)}


_ROW_KEY = ("method", "layer", "target", "selection", "steps", "checkpoint", "precision")


def earlier_faithfulness_rows(run: RunDir) -> list[dict[str, Any]]:
    """The rows of gradcam/metrics.json, read before anything is computed or written, so that a
    hand-edited file that cannot be merged stops the call at once."""
    path = run.faithfulness_path
    if not path.exists():
        return []
    document = run.read_json(path)
    rows = document.get("results") if isinstance(document, dict) else None
    scalar = (str, int, float, type(None))
    if not isinstance(rows, list) or not all(
        isinstance(row, dict) and all(isinstance(row.get(key), scalar) for key in _ROW_KEY) for row in rows
    ):
        raise RunError(
            f"'{path}' is not a cifarcam faithfulness file (an object whose 'results' are rows)",
            hint="move it away or delete it; the next --metrics call writes a new one",
        )
    return rows


def faithfulness_file(
    run: RunDir,
    earlier: list[dict[str, Any]],
    rows: list[dict[str, Any]],
    selection: str,
    steps: int,
    checkpoint: str,
    precision: str,
) -> dict[Path, bytes]:
    """gradcam/metrics.json (path and bytes): rows from earlier calls are kept unless this call
    recomputed them: the same method, layer, target, images, steps, checkpoint and precision
    (each row names its own)."""
    path = run.faithfulness_path
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
