"""Training augmentation: batched tensor ops on the training device (flip, translate, cutout),
the default; and albumentations pipelines run per sample in DataLoader workers, the alternative.

Every op draws from a seeded generator, so a seeded run is reproducible. Each op draws its
random numbers for a whole (global) batch and uses the `rows` a process holds, so a batch split
over processes is augmented exactly as the unsplit batch.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch.utils.data import DataLoader, get_worker_info

from cifarcam.config import AugmentConfig
from cifarcam.data import Split
from cifarcam.errors import ConfigError


def _rows(x: torch.Tensor, rows: slice | None, batch: int | None) -> tuple[slice, int]:
    """The rows of the global batch that `x` holds, and the global batch size."""
    if rows is None:
        return slice(0, x.shape[0]), x.shape[0]
    assert batch is not None
    return rows, batch


def random_flip(
    x: torch.Tensor, generator: torch.Generator, rows: slice | None = None, batch: int | None = None
) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    rows, batch = _rows(x, rows, batch)
    flip = torch.rand(batch, generator=generator, device=x.device)[rows] < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


def random_translate(
    x: torch.Tensor,
    pad: int,
    generator: torch.Generator,
    rows: slice | None = None,
    batch: int | None = None,
) -> torch.Tensor:
    """Shift each image by up to `pad` pixels each way (a random crop of the reflect-padded image)."""
    if pad == 0:
        return x
    rows, batch = _rows(x, rows, batch)
    count, _, height, width = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect").permute(0, 2, 3, 1)
    offsets = torch.randint(0, 2 * pad + 1, (2, batch), generator=generator, device=x.device)[:, rows]
    ys = offsets[0].view(-1, 1, 1) + torch.arange(height, device=x.device).view(1, -1, 1)
    xs = offsets[1].view(-1, 1, 1) + torch.arange(width, device=x.device).view(1, 1, -1)
    items = torch.arange(count, device=x.device).view(-1, 1, 1)
    # (B, H, W, C) gathered, permuted back to (B, C, H, W) in channels_last memory order.
    return padded[items, ys, xs].permute(0, 3, 1, 2)


def cutout(
    x: torch.Tensor,
    size: int,
    generator: torch.Generator,
    rows: slice | None = None,
    batch: int | None = None,
) -> torch.Tensor:
    """Zero one size x size square per image, centred uniformly (it may be clipped at the edge)."""
    if size == 0:
        return x
    rows, batch = _rows(x, rows, batch)
    height, width = x.shape[2:]
    centres = torch.rand(2, batch, generator=generator, device=x.device)[:, rows]
    top = (centres[0] * height).long() - size // 2
    left = (centres[1] * width).long() - size // 2
    ys = torch.arange(height, device=x.device).view(1, -1, 1)
    xs = torch.arange(width, device=x.device).view(1, 1, -1)
    top, left = top.view(-1, 1, 1), left.view(-1, 1, 1)
    inside = (ys >= top) & (ys < top + size) & (xs >= left) & (xs < left + size)
    return x * (~inside).unsqueeze(1).to(x.dtype)


def augment_batch(
    x: torch.Tensor,
    config: AugmentConfig,
    generator: torch.Generator,
    rows: slice | None = None,
    batch: int | None = None,
) -> torch.Tensor:
    """Apply the configured ops to a normalised float batch (N, C, H, W): the whole batch, or
    `rows` of a global batch of `batch` images (the draws are those of the whole batch)."""
    if config.flip:
        x = random_flip(x, generator, rows, batch)
    x = random_translate(x, config.translate, generator, rows, batch)
    return cutout(x, config.cutout, generator, rows, batch)


def seed_project_pipeline() -> dict[str, Any]:
    """The seed project's mix (flip, shift-scale-rotate, coarse dropout) in A.to_dict form.

    Shift-scale-rotate is written as albumentations' Affine, which replaces it in 2.x.
    """
    import albumentations as A

    pipeline = A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            A.Affine(translate_percent=(-0.1, 0.1), scale=(0.9, 1.1), rotate=(-15, 15), p=0.5),
            A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=(8, 8), hole_width_range=(8, 8), p=0.5),
        ]
    )
    return dict(A.to_dict(pipeline))


def _always(node: Any) -> Any:
    """A serialised pipeline with every probability set to 1, so that each transform runs."""
    if isinstance(node, dict):
        return {key: 1.0 if key == "p" else _always(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_always(item) for item in node]
    return node


def one_line(error: Exception) -> str:
    """An albumentations error in one line: the first of pydantic's errors about a parameter, or
    the message's lines joined."""
    cause = error.__cause__
    if isinstance(cause, ValidationError) and cause.errors():
        first = cause.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        return f"parameter '{where}': {first['msg']} (got {first.get('input')!r})"
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return f"{type(error).__name__}: {text}"


def _dropped(given: Any, kept: Any) -> list[str]:
    """The parameters of a serialised pipeline's transforms (`given`) that its round trip through
    albumentations (`kept`) lost, as 'name of Transform'."""
    if isinstance(given, list) and isinstance(kept, list) and len(given) == len(kept):
        return [name for one, other in zip(given, kept, strict=True) for name in _dropped(one, other)]
    if not isinstance(given, dict) or not isinstance(kept, dict):
        return []
    transform = given.get("__class_fullname__")
    lost = [f"'{key}' of {transform}" for key in given if key not in kept] if transform else []
    for key in ("transform", "transforms"):  # the pipeline's root, and a Compose's members
        lost += _dropped(given.get(key), kept.get(key))
    return lost


def load_pipeline(value: dict[str, Any], refuse_dropped: bool = False) -> Any:
    """The albumentations Compose of a serialised pipeline, with albumentations' notices
    silenced. With `refuse_dropped`, a parameter albumentations does not know (it only warns and
    drops it: a misspelt name, or `always_apply` of albumentations 1.x) is an error."""
    import albumentations as A

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            pipeline = A.from_dict(value)
        except Exception as error:
            raise ValueError(f"not an albumentations pipeline ({one_line(error)})") from None
        lost = _dropped(value, A.to_dict(pipeline)) if refuse_dropped else []
    if lost:
        several = len(lost) > 1
        raise ValueError(
            f"unknown albumentations parameter{'s' * several} {', '.join(lost)} "
            f"(albumentations would drop {'them' if several else 'it'})"
        )
    return pipeline


def pipeline_problem(image: Any) -> str | None:
    """What is wrong with an albumentations pipeline's output, or None for a 32x32x3 uint8 image
    (cifarcam converts images to tensors itself; a resize or crop would train on images unlike
    the test set)."""
    if isinstance(image, np.ndarray) and image.shape == (32, 32, 3) and image.dtype == np.uint8:
        return None
    got = f"{tuple(image.shape)} {image.dtype}" if hasattr(image, "shape") else type(image).__name__
    return (
        f"the albumentations pipeline must keep 32x32x3 uint8 images (it made {got}); "
        "cifarcam converts them to tensors itself"
    )


PIPELINE_PROBES = 64  # seeded draws of the pipeline as given, and of it with every p set to 1


def check_pipeline(value: dict[str, Any], refuse_dropped: bool) -> None:
    """The pipeline loads, and turns 32x32 RGB uint8 images into others of that size and type,
    checked before training starts, so a bad pipeline never replaces a run. Enough draws that a
    transform changing the size one time in ten is caught; the training loader checks every image
    as well."""
    pipelines = [load_pipeline(value, refuse_dropped), load_pipeline(_always(value))]
    probe = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    for pipeline in pipelines:
        pipeline.set_random_seed(0)
        for _ in range(PIPELINE_PROBES):
            try:
                image = pipeline(image=probe)["image"]
            except Exception as error:
                raise ValueError(
                    f"the albumentations pipeline fails on a 32x32 RGB image ({one_line(error)})"
                ) from None
            problem = pipeline_problem(image)
            if problem is not None:
                raise ValueError(problem)


class AlbumentationsDataset(torch.utils.data.Dataset[tuple[torch.Tensor, int, str]]):
    """Per-sample albumentations over uint8 HWC images; returns uint8 CHW tensors.

    A pipeline that fails on an image, or changes its size or type, does not raise in the worker
    (the DataLoader would pass on a multi-line worker traceback): the sample comes back blank
    with the problem as its third element, for `albumentations_batches` to raise in one line.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, pipeline: dict[str, Any], seed: int) -> None:
        self.images = images
        self.labels = labels
        self.transform = load_pipeline(pipeline)
        self.transform.set_random_seed(seed)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        try:
            image = self.transform(image=self.images[index])["image"]
            problem = pipeline_problem(image)
        except Exception as error:
            problem = f"the albumentations pipeline failed ({one_line(error)})"
        if problem is not None:
            blank = torch.zeros(self.images.shape[3], *self.images.shape[1:3], dtype=torch.uint8)
            return blank, int(self.labels[index]), f"image {index} of the training split: {problem}"
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), int(self.labels[index]), ""


def _seed_worker(_worker_id: int) -> None:
    info = get_worker_info()
    if info is not None:
        info.dataset.transform.set_random_seed(info.seed % 2**32)  # type: ignore[attr-defined]


def _loader(
    train: Split, order: torch.Tensor, pipeline: dict[str, Any], batch_size: int, workers: int, seed: int
) -> DataLoader[tuple[torch.Tensor, int, str]]:
    """A DataLoader over the images of `train` at the indices `order`, in that order, that applies
    `pipeline` per image in `workers` processes."""
    images = train.images.cpu().permute(0, 2, 3, 1).contiguous().numpy()
    dataset = AlbumentationsDataset(images, train.labels.cpu().numpy(), pipeline, seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=order.tolist(),
        num_workers=workers,
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=_seed_worker,
        persistent_workers=workers > 0,
    )


def albumentations_batches(
    train: Split, order: torch.Tensor, pipeline: dict[str, Any], batch_size: int, workers: int, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The (uint8 images, labels) batches of `train` at the indices `order`, in that order, with
    `pipeline` applied per image in `workers` processes. The first image the pipeline fails on
    (or returns resized or retyped) raises ConfigError, in one line."""
    for images, labels, problems in _loader(train, order, pipeline, batch_size, workers, seed):
        for problem in problems:
            if problem:
                raise ConfigError(problem, hint="fix the pipeline in the config's 'albumentations' field")
        yield images, labels
