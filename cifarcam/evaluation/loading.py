"""The commands over a trained run (evaluate, misclassified) and the loading they share
(a run's checkpoint, its test set, cached test logits), as library calls the CLI wraps.

Nothing here prints: results come back as values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cifarcam.config import TrainConfig, build_config, data_dir_path
from cifarcam.data.datasets import Split, denormalize, load_dataset, normalize
from cifarcam.devices import memory_format, resolve_device, training_dtype
from cifarcam.errors import (
    CheckpointError,
    ConfigError,
    RunError,
)
from cifarcam.evaluation.inference import Tta, predict
from cifarcam.runs.formats import CheckpointInfo
from cifarcam.runs.rundir import RunDir


@dataclass
class LoadedRun:
    run: RunDir
    model: nn.Module
    info: CheckpointInfo
    test: Split  # on `device`
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    test_fingerprint: str  # `Split.fingerprint` of the test set: the logits cache and maps files name it

    def predict_test(self, tta: Tta = "none", plain_logits: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 logits (N, C) on the CPU for the whole test set (`engine.predict`)."""
        return predict(
            self.model,
            self.test.images,
            self.info.mean,
            self.info.std,
            amp_dtype=self.amp_dtype,
            tta=tta,
            channels_last=self.channels_last,
            plain_logits=plain_logits,
        ).cpu()

    def test_inputs(self, indices: torch.Tensor) -> torch.Tensor:
        """Test images `indices` as the model takes them: normalised float, on the device."""
        images = self.test.images[indices.to(self.device)]
        return normalize(images, self.info.mean, self.info.std).float()

    def test_display(self, indices: torch.Tensor) -> np.ndarray:
        """The same images un-normalised with the checkpoint's mean/std, (N, 3, H, W) in [0, 1]."""
        return denormalize(self.test_inputs(indices), self.info.mean, self.info.std).cpu().numpy()

    def cam_model(self) -> nn.Module:
        """The model for CAM work: float32 weights in channels_last, in eval mode."""
        return self.model.float().to(memory_format=memory_format(channels_last=True)).eval()


def read_config(run: RunDir) -> TrainConfig:
    run.require()
    try:
        return build_config(run.read_json(run.config_path))
    except ConfigError as error:
        raise RunError(f"'{run.config_path}' is not a valid cifarcam config: {error.message}") from None


def load_checkpoint(
    run: RunDir, checkpoint: str = "last", device_name: str = "auto"
) -> tuple[nn.Module, CheckpointInfo, TrainConfig, torch.device]:
    """The run's model rebuilt from its checkpoint alone and checked against config.json; no data
    is read. The model stays on the CPU in float32; the device is resolved for the caller."""
    run.require()
    device = resolve_device(device_name)
    model, info = run.load_model(checkpoint)
    config = read_config(run)
    if (info.model, info.width) != (config.model, config.width):
        raise CheckpointError(
            f"checkpoint '{run.checkpoint_path(checkpoint)}' holds {info.model} width {info.width}, "
            f"but the run's config.json says {config.model} width {config.width}"
        )
    return model, info, config, device


def load_run(run: RunDir, checkpoint: str = "last", device_name: str = "auto") -> LoadedRun:
    """The run's model (from its checkpoint alone) and its test set, ready on the device."""
    model, info, config, device = load_checkpoint(run, checkpoint, device_name)
    dataset = load_dataset(config.data, data_dir_path(config))
    if dataset.classes != info.classes:
        raise RunError(
            f"the data at '{config.data}' has classes {dataset.classes}, "
            f"but the checkpoint was trained on {info.classes}"
        )
    fingerprint = dataset.test.fingerprint()
    trained_on = _recorded_test_fingerprint(run, dataset.source)
    if trained_on is not None and trained_on != fingerprint:
        raise RunError(
            f"the test images at '{config.data}' have changed since run '{run.name}' was trained "
            "(same classes, other pixels or labels): its results would not be comparable",
            hint="put the data back as it was, or train a new run on the new data",
        )
    amp_dtype = training_dtype(device, config.precision)
    model = model.to(device).to(memory_format=memory_format(config.channels_last)).eval()
    return LoadedRun(
        run, model, info, dataset.test.to(device), device, amp_dtype, config.channels_last, fingerprint
    )


def _recorded_test_fingerprint(run: RunDir, source: str) -> str | None:
    """The digest of the test set `train` recorded in meta.json, when it trained on the data at
    `source` too (a config.json pointed at other data on purpose is scored on it); None when
    meta.json cannot be read."""
    try:
        meta = run.read_meta()
    except RunError:
        return None
    recorded = meta.get("test_fingerprint")
    return recorded if isinstance(recorded, str) and meta.get("data") == source else None


def test_logits(loaded: LoadedRun, write: bool = True) -> torch.Tensor:
    """Float32 logits (N, C) on the test set, cached per checkpoint in predictions.safetensors
    (computed and not cached with `write=False`, for readers that must not touch the run)."""
    fingerprint = loaded.test_fingerprint
    cached = loaded.run.read_test_logits(loaded.info.checkpoint_id, fingerprint)
    if cached is not None:
        return cached
    logits = loaded.predict_test()
    if write:
        loaded.run.save_test_logits(logits, loaded.info.checkpoint_id, fingerprint)
    return logits
