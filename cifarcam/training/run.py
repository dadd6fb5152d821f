"""The train and resume commands on a run directory, as library calls the CLI wraps: the input
checked and the data loaded before the run is touched, the run locked and its records started;
the epochs themselves are cifarcam.training.loop's (the commands over a trained run are in
cifarcam.evaluation.loading).

Nothing here prints: progress goes out through callbacks, results come back as values.
"""

from __future__ import annotations

import contextlib
import platform
import sys
from typing import Any

import torch

import cifarcam
from cifarcam.config import TrainConfig, config_to_json, data_dir_path
from cifarcam.data.datasets import load_dataset, split_train
from cifarcam.devices import precision_name, resolve_device, training_dtype
from cifarcam.errors import RunError, UsageError
from cifarcam.evaluation.loading import read_config
from cifarcam.runs.files import atomic_write_text
from cifarcam.runs.rundir import RunDir, now_iso
from cifarcam.training import resume as resumption
from cifarcam.training.distributed import SINGLE, Group
from cifarcam.training.loop import (
    Prepared,
    StopSignal,
    TrainCallbacks,
    interrupted,
    never_left_running,
    train_loop,
)


def _prepare(config: TrainConfig, group: Group = SINGLE) -> Prepared:
    """Everything that can fail on bad input, done before the run directory is touched."""
    device = resolve_device(config.device, group.local_rank if group.distributed else None)
    if group.distributed and config.albumentations is not None:
        raise UsageError(
            "an albumentations pipeline trains in one process only (its DataLoader workers "
            "draw their own order); under torchrun use the on-device augmentation"
        )
    if group.distributed and config.sync_bn and device.type != "cuda":
        raise UsageError(
            "--sync-bn needs CUDA: SyncBatchNorm does not run on the CPU, where each process "
            "normalises its share of the batch with its own statistics",
            hint="leave out --sync-bn, or use --norm group for normalisation without batch statistics",
        )
    if config.precision == "fp16" and device.type != "cuda":
        raise UsageError(f"--precision fp16 needs CUDA (the device is {device.type}); use bf16 or fp32")
    dataset = load_dataset(config.data, data_dir_path(config))
    train_split, validation = split_train(
        dataset.train, dataset.classes, config.subset, config.val_split, config.seed
    )
    if len(train_split) == 0:
        raise UsageError("no training images are left after --val-split")
    return Prepared(device, training_dtype(device, config.precision), dataset, train_split, validation)


def _environment(prepared: Prepared, command: str, group: Group) -> dict[str, Any]:
    device = prepared.device
    return {
        "cifarcam_version": cifarcam.__version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "precision": precision_name(prepared.amp_dtype),
        "command": command or " ".join(sys.argv),
        "data": prepared.dataset.source,
        **prepared.data_facts,
        "test_images": len(prepared.dataset.test),
        "test_fingerprint": prepared.test_fingerprint,  # later commands score this test set
        "world_size": group.world_size,
    }


def train(
    config: TrainConfig,
    run: RunDir,
    overwrite: bool = False,
    command: str = "",
    callbacks: TrainCallbacks | None = None,
    stop: StopSignal | None = None,
    group: Group = SINGLE,
) -> list[dict[str, float]]:
    """Train a model as configured, writing config, meta, metrics and checkpoints into `run`.

    Under torchrun only rank 0 locks and writes the run directory; every step that can fail
    is agreed on by all ranks, so an error is printed once and no rank is left waiting.
    """
    config_json = config_to_json(config)  # what can fail is done before an earlier run is replaced
    group.from_main(run.refuse_nesting)
    prepared = group.agree(lambda: _prepare(config, group))
    with contextlib.ExitStack() as lock:

        def start() -> None:
            if stop is not None and stop.signal is not None:  # while the data loaded: nothing touched
                raise interrupted(stop.signal, f"before training started; run '{run.name}' was not changed")
            lock.enter_context(run.lock())
            run.start_training(overwrite)
            atomic_write_text(run.config_path, config_json)
            run.update_meta(
                status="running",
                started_at=now_iso(),
                ended_at=None,
                **_environment(prepared, command, group),
            )

        group.from_main(start)
        with never_left_running(run, group):
            return train_loop(config, run, prepared, None, callbacks or TrainCallbacks(), stop, group)


def resume(
    run: RunDir,
    command: str = "",
    callbacks: TrainCallbacks | None = None,
    stop: StopSignal | None = None,
    group: Group = SINGLE,
) -> list[dict[str, float]]:
    """Continue a run from its last saved state (or from the start if none was saved).

    Under torchrun rank 0 reads the config and the state and sends them to the other ranks.
    """
    config = group.from_main(lambda: read_config(run))

    def check_config_early() -> None:
        """A changed config.json is refused before the data load, from the state file's header
        (checked again with the whole state, under the run's lock, below)."""
        saved = run.read_state_meta()
        if saved is not None:
            resumption.check_same_config(run, config, saved)

    group.from_main(check_config_early)
    prepared = group.agree(lambda: _prepare(config, group))
    with contextlib.ExitStack() as lock:

        def load() -> tuple[
            tuple[dict[str, torch.Tensor], dict[str, Any]] | None, list[dict[str, Any]] | None
        ]:
            """The state to continue from, or the records of a run that has nothing left to train."""
            lock.enter_context(run.lock())
            run.remove_temporaries()
            state = run.load_state()
            if state is not None:
                resumption.check_same_config(run, config, state[1])
            if state is None and (run.checkpoint_path("last").exists() or run.metrics_path.exists()):
                records = resumption.finished_without_state(run, config)
                if records is not None:  # nothing to resume; its results are all there
                    return None, records
                raise RunError(  # starting over would replace its epochs without --overwrite
                    f"run '{run.name}' has trained epochs but no training state to resume from "
                    f"('{run.state_path}' is missing)",
                    hint=f"train it again from the start with 'cifarcam train --run {run.name} --overwrite'",
                )
            if (
                state is not None
                and state[1]["epoch"] >= config.epochs
                and resumption.derived_files_saved(run, state)
            ):
                run.update_meta(status="finished")
                return state, list(state[1]["records"])
            # else also a run whose last epoch's state was saved but not all the files derived
            # from it (killed in between): train_loop writes them again from the state
            meta = run.read_meta() if run.meta_path.exists() else {}
            resumed = meta.get("resumed_at")
            environment = _environment(prepared, command, group)
            if state is not None:
                resumption.check_same_data(run, state[1].get("data") or {}, environment)
            run.update_meta(
                status="running",
                started_at=meta.get("started_at") or now_iso(),
                resumed_at=[*(resumed if isinstance(resumed, list) else []), now_iso()],
                ended_at=None,
                error=None,
                **environment,
            )
            return state, None

        state, finished = group.from_main(load)
        if finished is not None:
            return finished
        with never_left_running(run, group):
            return train_loop(config, run, prepared, state, callbacks or TrainCallbacks(), stop, group)
