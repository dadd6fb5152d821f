"""albumentations pipelines, the alternative to the on-device augmentation: loaded and checked
from their A.to_dict form, and run per sample in DataLoader workers."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from torch.utils.data import DataLoader, get_worker_info

from cifarcam.data.datasets import Split
from cifarcam.errors import ConfigError


def seed_project_pipeline() -> dict[str, Any]:
    """The seed project's mix (flip, Affine shift-scale-rotate, coarse dropout) in A.to_dict form."""
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


def load_pipeline(value: dict[str, Any]) -> Any:
    """The albumentations Compose of a serialised pipeline, with albumentations' notices silenced."""
    import albumentations as A

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return A.from_dict(value)
        except Exception as error:
            raise ValueError(f"not an albumentations pipeline ({one_line(error)})") from None


def pipeline_problem(image: Any) -> str | None:
    """What is wrong with a pipeline's output, or None for a 32x32x3 uint8 image (cifarcam makes the
    tensors itself; a resize or crop would train on images unlike the test set)."""
    if isinstance(image, np.ndarray) and image.shape == (32, 32, 3) and image.dtype == np.uint8:
        return None
    got = f"{tuple(image.shape)} {image.dtype}" if hasattr(image, "shape") else type(image).__name__
    return (
        f"the albumentations pipeline must keep 32x32x3 uint8 images (it made {got}); "
        "cifarcam converts them to tensors itself"
    )


def check_pipeline(value: dict[str, Any]) -> None:
    """Before training: the pipeline loads and, every transform applied, keeps a 32x32 RGB uint8 image."""
    load_pipeline(value)  # its parameters as given
    pipeline = load_pipeline(_always(value))
    pipeline.set_random_seed(0)
    probe = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
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
    """Per-sample albumentations over uint8 HWC images; returns uint8 CHW tensors. A pipeline that
    fails on an image, or changes its size or type, does not raise in the worker (the DataLoader
    would pass on a multi-line traceback): the sample comes back blank with the problem as its
    third element, for `albumentations_batches` to raise in one line."""

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


def albumentations_batches(
    train: Split, order: torch.Tensor, pipeline: dict[str, Any], batch_size: int, workers: int, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The (uint8 images, labels) batches of `train` at the indices `order`, in that order, with
    `pipeline` applied per image in `workers` processes. The first image the pipeline fails on
    (or returns resized or retyped) raises ConfigError, in one line."""
    images_hwc = train.images.cpu().permute(0, 2, 3, 1).contiguous().numpy()
    loader = DataLoader(
        AlbumentationsDataset(images_hwc, train.labels.cpu().numpy(), pipeline, seed),
        batch_size=batch_size,
        sampler=order.tolist(),
        num_workers=workers,
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=_seed_worker,
        persistent_workers=workers > 0,
    )
    for images, labels, problems in loader:
        for problem in problems:
            if problem:
                raise ConfigError(problem, hint="fix the pipeline in the config's 'albumentations' field")
        yield images, labels
