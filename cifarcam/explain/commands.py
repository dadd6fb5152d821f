"""The explanation commands over a trained run: `gradcam` (maps, galleries, faithfulness) and
`sanity` (the cascading randomisation check, sanity/<method>_<layer>.png/.json). The files
`gradcam` writes are stored_maps' business."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cifarcam.data.datasets import IMAGE_SIZE
from cifarcam.devices import autocast_dtype, precision_name
from cifarcam.errors import UsageError
from cifarcam.evaluation.commands import select_misclassified
from cifarcam.evaluation.label_issues import label_issue_marks
from cifarcam.evaluation.loading import LoadedRun, load_run, test_logits
from cifarcam.explain import stored_maps
from cifarcam.explain.extractor import CamExtractor, check_layers, guided_backprop, guided_grad_cam
from cifarcam.explain.faithfulness import faithfulness, random_maps
from cifarcam.explain.methods import METHODS, check_methods
from cifarcam.explain.sanity import cascading_randomization, similarity_table
from cifarcam.explain.stored_maps import GUIDED, Explanations
from cifarcam.report import figures
from cifarcam.runs import tensorboard
from cifarcam.runs.files import atomic_write_files, json_bytes
from cifarcam.runs.rundir import RunDir, reads_run

ALL_METHODS = (*METHODS, *GUIDED)
GALLERY_ROWS = 24  # a gallery shows at most this many mistakes; maps and metrics cover all
ProgressCallback = Callable[[int, int], None]  # (images done, images in all)
# From this many images, compiling the folded layers below the CAM layer (seconds, once) pays off.
COMPILE_FROM_IMAGES = 1024


def resolve_target(spec: str, classes: list[str]) -> list[str]:
    """--target: pred, true, both, or a class given by name or index -> target keys."""
    if spec == "both":
        return ["pred", "true"]
    if spec in ("pred", "true"):
        return [spec]
    if spec in classes:
        return [f"class:{spec}"]
    if spec.isascii() and spec.isdigit() and int(spec) < len(classes):
        return [f"class:{classes[int(spec)]}"]
    raise UsageError(
        f"--target '{spec}' is not pred, true, both, a class name or a class index 0-{len(classes) - 1}; "
        f"classes: {', '.join(classes)}"
    )


def _target_classes(key: str, pred: torch.Tensor, true: torch.Tensor, classes: list[str]) -> torch.Tensor:
    if key == "pred":
        return pred
    if key == "true":
        return true
    return torch.full_like(pred, classes.index(key.removeprefix("class:")))


def _cam_methods(methods: list[str]) -> list[str]:
    """The CAM methods the extractor runs for `methods`: guided Grad-CAM needs Grad-CAM's maps."""
    cam_methods = [m for m in methods if m in METHODS]
    if "guided-gradcam" in methods and "gradcam" not in cam_methods:
        cam_methods.append("gradcam")
    return cam_methods


def _explain_batch(
    extractor: CamExtractor, x: torch.Tensor, wanted: dict[str, torch.Tensor], methods: list[str]
) -> dict[tuple[str, str, str], torch.Tensor]:
    """Maps (attributions for the guided methods) of one batch at the extractor's layers, keyed
    (target, method, layer); guided-backprop's layer is ''. The extractor runs `_cam_methods`."""
    maps = extractor(x, wanted).maps if _cam_methods(methods) else {}
    results: dict[tuple[str, str, str], torch.Tensor] = {}
    for key, classes in wanted.items():
        for method in methods:
            if method in METHODS:
                results |= {(key, method, layer): maps[key][method][layer] for layer in extractor.layers}
        if any(m in GUIDED for m in methods):
            guided = guided_backprop(extractor.model, x, classes)
            results[(key, "guided-backprop", "")] = guided
            if "guided-gradcam" in methods:
                for layer in extractor.layers:
                    results[(key, "guided-gradcam", layer)] = guided_grad_cam(
                        guided, maps[key]["gradcam"][layer]
                    )
    return results


def explain_images(
    loaded: LoadedRun,
    indices: torch.Tensor,
    pred: torch.Tensor,
    methods: list[str],
    layers: list[str],
    targets: list[str],
    batch_size: int = 256,
    on_progress: ProgressCallback | None = None,
    amp_dtype: torch.dtype | None = None,
) -> Explanations:
    """Maps (and guided attributions) for `indices`, batch by batch, one forward pass per batch."""
    true = loaded.test.labels.cpu()[indices]
    parts: defaultdict[tuple[str, str, str], list[torch.Tensor]] = defaultdict(list)
    compiled = len(indices) >= COMPILE_FROM_IMAGES
    cam_methods = _cam_methods(methods) or ["gradcam"]
    extractor = CamExtractor(loaded.cam_model(), layers, cam_methods, amp_dtype, fast=True, compiled=compiled)
    with extractor:
        for start in range(0, len(indices), batch_size):
            batch = slice(start, start + batch_size)
            wanted = {
                key: _target_classes(key, pred[batch], true[batch], loaded.info.classes).to(loaded.device)
                for key in targets
            }
            x = loaded.test_inputs(indices[batch])
            for key, result in _explain_batch(extractor, x, wanted, methods).items():
                parts[key].append(result.cpu())
            if on_progress:
                on_progress(min(start + batch_size, len(indices)), len(indices))
    maps = {key: torch.cat(chunks) for key, chunks in parts.items() if key[1] in methods}
    return Explanations(indices, pred, true, maps)


def _groups(methods: list[str], layers: list[str]) -> list[tuple[str, str]]:
    """(method, layer) column groups; guided-backprop does not depend on the layer."""
    pairs = ((m, "" if m == "guided-backprop" else layer) for m in methods for layer in layers)
    return list(dict.fromkeys(pairs))


def _faithfulness_rows(
    loaded: LoadedRun,
    explained: Explanations,
    target: str,
    methods: list[str],
    layers: list[str],
    steps: int,
    batch_size: int,
) -> list[dict[str, Any]]:
    model = loaded.cam_model()
    x = loaded.test_inputs(explained.indices)
    classes = _target_classes(target, explained.pred, explained.true, loaded.info.classes).to(loaded.device)
    candidates: list[tuple[str, str, torch.Tensor]] = [
        (m, layer, explained.maps[(target, m, layer)]) for m in methods if m in METHODS for layer in layers
    ]
    candidates.append(("random", "-", random_maps(len(x), x.shape[2], x.shape[3])))
    rows = []
    for method, layer, maps in candidates:
        scores = faithfulness(model, x, maps.to(loaded.device), classes, steps=steps, batch_size=batch_size)
        rows.append({"method": method, "layer": layer, "target": target, "images": len(x), **scores})
    return rows


@dataclass
class GradcamOutcome:
    paths: list[Path]
    metrics: list[dict[str, Any]]
    gallery_rows: int  # 0: no mistakes to show (possible with all_images)


@reads_run
def gradcam(
    run: RunDir,
    methods: list[str] | None = None,
    layers: list[str] | None = None,
    target: str = "both",
    count: int = 10,
    all_images: bool = False,
    metrics: bool = False,
    checkpoint: str = "last",
    device_name: str = "auto",
    batch_size: int = 256,
    steps: int = 16,
    on_progress: ProgressCallback | None = None,
    precision: str = "fp32",
) -> GradcamOutcome:
    """Maps for the `count` most confident mistakes (or the whole test set with `all_images`),
    a gallery of those mistakes, and faithfulness scores when `metrics` is set."""
    methods = check_methods(methods or ["gradcam"], ALL_METHODS)
    layers = list(dict.fromkeys(layers or ["layer4"]))
    if count < 1:
        raise UsageError("--count must be at least 1")
    if batch_size < 1 or steps < 1:
        raise UsageError("--batch-size and --steps must be at least 1")
    if steps > IMAGE_SIZE**2:  # more steps than pixels repeats the same masks, hours of passes
        raise UsageError(
            f"--steps must be at most {IMAGE_SIZE**2}, one per pixel of a {IMAGE_SIZE}x{IMAGE_SIZE} "
            f"image (got {steps})"
        )
    if precision not in ("fp32", "bf16", "auto"):
        raise UsageError(f"--precision '{precision}' is not one of: fp32, bf16, auto")
    loaded = load_run(run, checkpoint, device_name)
    amp_dtype = autocast_dtype(loaded.device, precision)
    targets = resolve_target(target, loaded.info.classes)
    check_layers(loaded.model, layers)
    probs = torch.softmax(test_logits(loaded), dim=1)
    pred_all, confidence_all = probs.argmax(1), probs.max(1).values
    labels = loaded.test.labels.cpu()
    if all_images:  # the gallery shows up to --count mistakes, and none when there are none
        count = min(count, int((pred_all != labels).sum()))
    mistakes = select_misclassified(probs, labels, count)
    label_issues, _ = label_issue_marks(probs, labels, loaded.info.classes)
    indices = torch.arange(len(probs)) if all_images else mistakes
    explained = explain_images(
        loaded, indices, pred_all[indices], methods, layers, targets, batch_size, on_progress, amp_dtype
    )
    rows = (mistakes if all_images else torch.arange(len(mistakes)))[:GALLERY_ROWS]
    groups = _groups(methods, layers)
    scores: list[dict[str, Any]] = []
    if metrics:
        scores = _faithfulness_rows(loaded, explained, targets[0], methods, layers, steps, batch_size)
    # Written together at the end, so a failed write leaves every earlier file as it was; under
    # `merging`, so the faithfulness rows another gradcam wrote meanwhile are kept.
    with run.merging():
        files = stored_maps.maps_files(run, explained, targets, groups, all_images, loaded, amp_dtype)
        if len(rows):
            stem = stored_maps.gallery_stem(methods, layers)
            files |= stored_maps.gallery_files(
                run,
                loaded,
                explained,
                rows,
                targets,
                groups,
                confidence_all[indices],
                stem,
                checkpoint,
                None if label_issues is None else label_issues[indices],
            )
        if metrics:
            selection = "all test images" if all_images else f"{count} most confident mistakes"
            files |= stored_maps.faithfulness_file(
                run, scores, selection, steps, checkpoint, precision_name(amp_dtype)
            )
        atomic_write_files(files)
    for path, content in files.items():
        if path.suffix == ".png":
            tensorboard.log_gallery(run, f"gradcam/{path.stem}", content, loaded.info.epoch)
    return GradcamOutcome(list(files), scores, len(rows))


@dataclass
class SanityOutcome:
    rows: list[dict[str, Any]]
    paths: list[Path]


@reads_run
def sanity(
    run: RunDir,
    method: str = "gradcam",
    layer: str = "layer4",
    count: int = 32,
    checkpoint: str = "last",
    device_name: str = "auto",
    seed: int = 0,
) -> SanityOutcome:
    """Cascading randomisation of `count` class-balanced test images' maps (predicted class)."""
    (method,) = check_methods([method], ALL_METHODS)
    if count < 2:
        raise UsageError("--count must be at least 2")
    if not 0 <= seed < 2**63 - 64:  # torch seeds are 64-bit; each block adds its position
        raise UsageError(f"--seed must be between 0 and {2**63 - 65} (got {seed})")
    loaded = load_run(run, checkpoint, device_name)
    model = loaded.cam_model()
    check_layers(model, [layer])  # also for guided-backprop, which then does not use it
    if count > len(loaded.test):
        raise UsageError(f"--count {count} is larger than the {len(loaded.test)} test images")
    indices = torch.linspace(0, len(loaded.test) - 1, count).round().long()
    pred = torch.softmax(test_logits(loaded), dim=1).argmax(1)[indices]
    x = loaded.test_inputs(indices)
    wanted = {"pred": pred.to(loaded.device)}
    shown_layer = "" if method == "guided-backprop" else layer  # guided-backprop has no layer

    def compute_maps(candidate: nn.Module) -> torch.Tensor:
        with CamExtractor(candidate, [layer], _cam_methods([method]) or ["gradcam"]) as extractor:
            result = _explain_batch(extractor, x, wanted, [method])
        maps = result[("pred", method, shown_layer)]
        if method in GUIDED:  # attributions: their magnitude, scaled to [0, 1] per image
            magnitude = maps.abs().sum(dim=1)
            maps = magnitude / magnitude.flatten(1).amax(dim=1).clamp_min(1e-12).view(-1, 1, 1)
        return maps.cpu()

    steps, maps = cascading_randomization(model, compute_maps, seed=seed)
    table = similarity_table(steps, maps)
    name = f"{method}_{shown_layer}" if shown_layer else method
    where = f"{method} at {shown_layer}" if shown_layer else method
    plot = figures.sanity_plot(
        table,
        [m[0].numpy() for m in maps],
        f"run {run.name}: cascading randomisation sanity check for {where}, {count} test images "
        "(predicted class); bottom: the first image's map at each step",
    )
    sidecar_record = {
        "method": method,
        "layer": shown_layer,
        "images": count,
        "indices": indices.tolist(),
        "target": "pred",
        "seed": seed,
        "checkpoint": checkpoint,
        "steps": table,
    }
    png, sidecar = run.sanity_dir / f"{name}.png", run.sanity_dir / f"{name}.json"
    atomic_write_files({png: plot, sidecar: json_bytes(sidecar_record)})
    return SanityOutcome(table, [png, sidecar])
