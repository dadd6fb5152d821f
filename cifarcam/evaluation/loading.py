"""A trained run loaded for the commands that read it: its model from the checkpoint alone,
the test set it trained on, and the test logits cached in the run."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cifarcam.config import TrainConfig, build_config, data_dir_path
from cifarcam.data.datasets import Split, denormalize, load_dataset, normalize
from cifarcam.devices import memory_format, resolve_device, training_dtype
from cifarcam.errors import ConfigError, RunError
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
        """Float32 logits (N, C) on the CPU for the whole test set (`inference.predict`)."""
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
) -> tuple[nn.Module, CheckpointInfo, torch.device]:
    """The run's model rebuilt from its checkpoint alone (it names the architecture), on the CPU
    in float32, and the device resolved for the caller; neither data nor config.json is read."""
    run.require()
    device = resolve_device(device_name)
    model, info = run.load_model(checkpoint)
    return model, info, device


def load_run(run: RunDir, checkpoint: str = "last", device_name: str = "auto") -> LoadedRun:
    """The run's model (from its checkpoint alone) and its test set, ready on the device."""
    model, info, device = load_checkpoint(run, checkpoint, device_name)
    config = read_config(run)
    dataset = load_dataset(config.data, data_dir_path(config))
    if dataset.classes != info.classes:
        raise RunError(
            f"the data at '{config.data}' has classes {dataset.classes}, "
            f"but the checkpoint was trained on {info.classes}"
        )
    fingerprint = dataset.test.fingerprint()
    try:
        meta = run.read_meta()
    except RunError:  # no meta.json: nothing to compare with
        meta = {}
    # The digest `train` recorded, if it trained on these data (a config.json pointed at other
    # data on purpose is scored on them).
    trained_on = meta.get("test_fingerprint") if meta.get("data") == dataset.source else None
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
