"""Dataset sources (torchvision CIFAR-10, image-folder trees, synthetic), subsets and normalisation.
Every source ends as uint8 (N, 3, 32, 32) images and int64 labels, so the whole dataset can sit on
the training device and be augmented there in batches."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cifarcam.config import TORCHVISION_SETS
from cifarcam.errors import DataError, UsageError
from cifarcam.runs.files import atomic_open

# Channel statistics of the official CIFAR-10 training set; used to normalise every source
# and, from the checkpoint's copy, to un-normalise for display.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGE_SIZE = 32
_CACHE_VERSION = "1"


@dataclass
class Split:
    images: torch.Tensor  # uint8, (N, 3, 32, 32)
    labels: torch.Tensor  # int64, (N,)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def select(self, indices: torch.Tensor) -> Split:
        return Split(self.images[indices], self.labels[indices])

    def to(self, device: torch.device) -> Split:
        return Split(self.images.to(device), self.labels.to(device))

    def fingerprint(self) -> str:
        """A digest of every image and label: equal fingerprints, the same split (~50 ms for 10,000)."""
        digest = hashlib.blake2b(digest_size=16)
        for tensor in (self.images, self.labels):
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()


@dataclass
class Dataset:
    train: Split
    test: Split
    classes: list[str]
    source: str  # what was loaded, for meta.json


def default_data_dir() -> Path:
    """CIFARCAM_DATA_DIR, else the user cache directory."""
    env = os.environ.get("CIFARCAM_DATA_DIR")
    if env:
        return Path(env).expanduser()
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache_home) / "cifarcam"


def load_dataset(source: str, data_dir: Path | None = None) -> Dataset:
    """Load "cifar10" or "cifar100" (torchvision, downloaded on first use) or an image-folder tree."""
    data_dir = data_dir or default_data_dir()
    if source in TORCHVISION_SETS:
        return load_torchvision(source, data_dir)
    return load_image_folder(Path(source), data_dir)


def load_torchvision(name: str, data_dir: Path) -> Dataset:
    """CIFAR-10 or CIFAR-100 (its 100 fine classes) through torchvision, downloaded on first use."""
    from torchvision.datasets import CIFAR10, CIFAR100

    kind = CIFAR100 if name == "cifar100" else CIFAR10
    title = name.upper().replace("CIFAR", "CIFAR-")
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        splits = [kind(root=str(data_dir), train=train, download=True) for train in (True, False)]
    except Exception as error:  # torchvision raises URLError, RuntimeError, OSError...
        raise DataError(
            f"could not download {title} into '{data_dir}': {error}",
            hint="offline? pass --data PATH with an image-folder copy (PATH/train/<class>/*, "
            "PATH/test/<class>/*)",
        ) from None
    train, test = (
        Split(
            torch.from_numpy(np.ascontiguousarray(split.data.transpose(0, 3, 1, 2))),
            torch.tensor(split.targets, dtype=torch.int64),
        )
        for split in splits
    )
    return Dataset(train, test, list(splits[0].classes), source=f"{name} (torchvision)")


def _list_tree(root: Path) -> tuple[list[str], dict[str, list[tuple[str, int]]], str]:
    """Class names, files per split with labels, and a fingerprint of names, sizes and mtimes."""
    if not root.is_dir():
        raise DataError(f"data folder '{root}' does not exist")
    digest = hashlib.sha256(f"{_CACHE_VERSION}|{root.resolve()}".encode())
    classes_per_split: dict[str, list[str]] = {}
    for split in ("train", "test"):
        split_dir = root / split
        if not split_dir.is_dir():
            raise DataError(
                f"data folder '{root}' has no '{split}/' folder",
                hint="expected PATH/train/<class>/* and PATH/test/<class>/*",
            )
        classes_per_split[split] = sorted(
            entry.name for entry in os.scandir(split_dir) if entry.is_dir() and not entry.name.startswith(".")
        )
    classes = classes_per_split["train"]
    if not classes:
        raise DataError(f"'{root / 'train'}' has no class folders")
    if classes_per_split["test"] != classes:
        raise DataError(
            f"class folders differ between '{root / 'train'}' and '{root / 'test'}': "
            f"{classes} vs {classes_per_split['test']}"
        )
    # The class folders decide the labels, so they are part of the key even when empty
    digest.update(("classes:" + "/".join(classes) + "\n").encode())
    files: dict[str, list[tuple[str, int]]] = {}
    for split in ("train", "test"):
        entries: list[tuple[str, int]] = []
        for label, name in enumerate(classes):
            listing = sorted(
                (entry for entry in os.scandir(root / split / name) if not entry.name.startswith(".")),
                key=lambda entry: entry.name,
            )
            digest.update(
                "\n".join(
                    f"{split}/{name}/{entry.name}|{entry.stat().st_size}|{entry.stat().st_mtime_ns}"
                    for entry in listing
                ).encode("utf-8", "surrogateescape")  # file names need not be UTF-8
            )
            entries.extend((entry.path, label) for entry in listing)
        if not entries:
            raise DataError(f"'{root / split}' holds no images")
        files[split] = entries
    return classes, files, digest.hexdigest()[:20]


def _decode(path: str) -> np.ndarray:
    import cv2

    try:  # read by Python, which takes any file name the listing returned
        image = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_UNCHANGED)
    except (OSError, cv2.error):  # unreadable or empty
        image = None
    if image is None:
        raise DataError(f"'{path}' is not a readable image")
    if image.shape != (IMAGE_SIZE, IMAGE_SIZE, 3) or image.dtype != np.uint8:
        raise DataError(f"'{path}' is not a 32x32 8-bit RGB image (shape {image.shape}, {image.dtype})")
    return image[:, :, ::-1].transpose(2, 0, 1)  # BGR HWC -> RGB CHW


def load_image_folder(root: Path, cache_dir: Path) -> Dataset:
    """Decode PATH/{train,test}/<class>/* once; later loads read a uint8 cache in cache_dir."""
    classes, files, fingerprint = _list_tree(root)
    # One cache per tree: <folder name>-<path hash>-<content fingerprint>.npz
    tree_key = f"{root.resolve().name}-{hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:8]}"
    cache_path = cache_dir / "imagefolder" / f"{tree_key}-{fingerprint}.npz"
    if cache_path.is_file():
        with np.load(cache_path) as cached:
            arrays = dict(cached)
    else:
        arrays = {}
        with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
            for split in ("train", "test"):
                images = pool.map(_decode, (path for path, _ in files[split]), chunksize=256)
                arrays[f"{split}_images"] = np.stack(list(images))
                arrays[f"{split}_labels"] = np.array([label for _, label in files[split]], dtype=np.int64)
        try:
            with atomic_open(cache_path) as handle:
                np.savez(handle, **arrays)
            for stale in cache_path.parent.glob(f"{tree_key}-*.npz"):
                if stale != cache_path:
                    stale.unlink(missing_ok=True)
        except OSError:
            pass  # a cache we cannot write only costs time on the next run
    train, test = (
        Split(torch.from_numpy(arrays[f"{split}_images"]), torch.from_numpy(arrays[f"{split}_labels"]))
        for split in ("train", "test")
    )
    return Dataset(train, test, classes, source=str(root))


def synthetic_dataset(n_train: int = 512, n_test: int = 256, num_classes: int = 10, seed: int = 0) -> Dataset:
    """Learnable random data for tests: each class a 4x4 colour grid upsampled to 32x32 (so shifts
    and flips keep it recognisable, as with real images), plus pixel noise."""
    generator = torch.Generator().manual_seed(1_000_003 + seed)
    coarse = torch.rand(num_classes, 3, 4, 4, generator=generator)
    prototypes = F.interpolate(coarse, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)

    def make(count: int) -> Split:
        labels = torch.arange(count) % num_classes
        noise = torch.rand(count, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
        images = (0.7 * prototypes[labels] + 0.3 * noise) * 255
        return Split(images.round().to(torch.uint8), labels.to(torch.int64))

    classes = [f"class{i}" for i in range(num_classes)]
    return Dataset(make(n_train), make(n_test), classes, source="synthetic")


def balanced_indices(
    labels: torch.Tensor,
    count: int,
    num_classes: int,
    seed: int,
    what: str = "subset",
    names: Sequence[str] | None = None,
) -> torch.Tensor:
    """`count` indices spread evenly over the classes (the first count % C classes get one more);
    `names` (the class names) only make the error clearer."""
    if count > len(labels):
        raise UsageError(f"--{what} {count} is larger than the {len(labels)} training images")
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in range(num_classes):
        members = torch.nonzero(labels == label).flatten()
        wanted = count // num_classes + (1 if label < count % num_classes else 0)
        if wanted > len(members):
            name = f"'{names[label]}' (index {label})" if names is not None else str(label)
            raise UsageError(
                f"--{what} {count} needs {wanted} image{'s' * (wanted != 1)} of class {name}, "
                f"which has {len(members)}"
            )
        chosen.append(members[torch.randperm(len(members), generator=generator)[:wanted]])
    return torch.sort(torch.cat(chosen)).values


def split_train(
    train: Split, classes: Sequence[str], subset: int | None, val_split: int, seed: int
) -> tuple[Split, Split | None]:
    """Hold out a balanced validation set first, then draw the balanced training subset."""
    remaining = torch.arange(len(train))
    validation = None
    if val_split:
        val_idx = balanced_indices(train.labels, val_split, len(classes), seed, "val-split", classes)
        keep = torch.ones(len(train), dtype=torch.bool)
        keep[val_idx] = False
        remaining = remaining[keep]
        validation = train.select(val_idx)
    if subset is not None:
        picked = balanced_indices(train.labels[remaining], subset, len(classes), seed + 1, "subset", classes)
        remaining = remaining[picked]
    return train.select(remaining), validation


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 or [0,1] float images (N,3,H,W) -> normalised float32."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def denormalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Inverse of `normalize`, clamped to [0, 1]; use the same mean/std that normalised."""
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x * s + m).clamp(0.0, 1.0)
