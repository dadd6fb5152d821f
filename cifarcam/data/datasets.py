"""Dataset sources (torchvision CIFAR-10, image-folder trees, synthetic), subsets and normalisation.

Every source ends as uint8 tensors of shape (N, 3, 32, 32) plus int64 labels, so the whole
dataset can sit on the training device and be augmented there in batches.
"""

from __future__ import annotations

import hashlib
import os
import stat
import zipfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cifarcam.errors import DataError, UsageError
from cifarcam.runs.files import atomic_open

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
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
    """Load "cifar10" (torchvision, downloaded on first use) or an image-folder tree path."""
    data_dir = data_dir or default_data_dir()
    if source == "cifar10":
        return load_torchvision_cifar10(data_dir)
    return load_image_folder(Path(source), data_dir)


def load_torchvision_cifar10(data_dir: Path) -> Dataset:
    from torchvision.datasets import CIFAR10

    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        splits = [CIFAR10(root=str(data_dir), train=train, download=True) for train in (True, False)]
    except Exception as error:  # torchvision raises URLError, RuntimeError, OSError...
        raise DataError(
            f"could not download CIFAR-10 into '{data_dir}': {error}",
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
    return Dataset(train, test, list(CIFAR10_CLASSES), source="cifar10 (torchvision)")


def _is_text(name: str) -> bool:
    """Printable and UTF-8 (a name that is not comes from the file system with surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return name.isprintable()


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
        for name in classes_per_split[split]:  # they go into JSON, HTML and labels: text only
            if not _is_text(name):
                raise DataError(
                    f"class folder {os.fsencode(name)!r} in '{split_dir}' has a name that is not "
                    "printable UTF-8 text; rename it"
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
            class_dir = root / split / name
            listing = sorted(
                (entry for entry in os.scandir(class_dir) if not entry.name.startswith(".")),
                key=lambda entry: entry.name,
            )
            stats = [entry.stat() for entry in listing]
            for entry, st in zip(listing, stats, strict=True):
                if stat.S_ISFIFO(st.st_mode) or stat.S_ISSOCK(st.st_mode) or stat.S_ISCHR(st.st_mode):
                    # reading one would wait for a writer forever
                    raise DataError(
                        f"'{entry.path}' is not a readable image (it is a FIFO, socket or device)"
                    )
            digest.update(
                "\n".join(
                    f"{split}/{name}/{entry.name}|{st.st_size}|{st.st_mtime_ns}"
                    for entry, st in zip(listing, stats, strict=True)
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
        data = np.fromfile(path, np.uint8)
    except OSError:
        data = None
    try:
        image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data is not None and data.size else None
    except cv2.error:
        image = None
    if image is None:
        raise DataError(f"'{path}' is not a readable image")
    if image.shape != (IMAGE_SIZE, IMAGE_SIZE, 3) or image.dtype != np.uint8:
        raise DataError(f"'{path}' is not a 32x32 8-bit RGB image (shape {image.shape}, {image.dtype})")
    return image[:, :, ::-1].transpose(2, 0, 1)  # BGR HWC -> RGB CHW


def _decode_all(entries: list[tuple[str, int]]) -> Split:
    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        arrays = list(pool.map(_decode, (path for path, _ in entries), chunksize=256))
    images = np.stack(arrays)
    labels = np.array([label for _, label in entries], dtype=np.int64)
    return Split(torch.from_numpy(images), torch.from_numpy(labels))


def load_image_folder(root: Path, cache_dir: Path) -> Dataset:
    """Decode PATH/{train,test}/<class>/* once; later loads read a uint8 cache in cache_dir."""
    classes, files, fingerprint = _list_tree(root)
    # One cache per tree: <folder name>-<path hash>-<content fingerprint>.npz
    tree_key = f"{root.resolve().name}-{hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:8]}"
    cache_path = cache_dir / "imagefolder" / f"{tree_key}-{fingerprint}.npz"
    if cache_path.is_file():
        try:
            with np.load(cache_path) as cached:
                splits = {
                    split: Split(
                        torch.from_numpy(cached[f"{split}_images"]),
                        torch.from_numpy(cached[f"{split}_labels"]),
                    )
                    for split in ("train", "test")
                }
            for split, entries in files.items():
                images, labels = splits[split].images, splits[split].labels
                if images.shape != (len(entries), 3, IMAGE_SIZE, IMAGE_SIZE) or labels.shape != (
                    len(entries),
                ):
                    raise ValueError("the cache does not hold this tree's images")
            return Dataset(splits["train"], splits["test"], classes, source=str(root))
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            pass  # unreadable or foreign cache: decode again and replace it
    splits = {split: _decode_all(files[split]) for split in ("train", "test")}
    try:
        with atomic_open(cache_path) as handle:
            arrays = {
                f"{s}_{part}": getattr(splits[s], part).numpy()
                for s in splits
                for part in ("images", "labels")
            }
            np.savez(handle, **arrays)
        for stale in cache_path.parent.glob(f"{tree_key}-*.npz"):
            if stale != cache_path:
                stale.unlink(missing_ok=True)
    except OSError:
        pass  # a cache we cannot write only costs time on the next run
    return Dataset(splits["train"], splits["test"], classes, source=str(root))


def synthetic_dataset(n_train: int = 512, n_test: int = 256, num_classes: int = 10, seed: int = 0) -> Dataset:
    """Learnable random data for tests: each class is a smooth colour pattern plus pixel noise.

    The patterns are 4x4 colour grids upsampled to 32x32, so small shifts and flips keep them
    recognisable, as with real images.
    """
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
    x = images.float()
    if images.dtype == torch.uint8:
        x = x / 255.0
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def denormalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Inverse of `normalize`, clamped to [0, 1]; use the same mean/std that normalised."""
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x * s + m).clamp(0.0, 1.0)
