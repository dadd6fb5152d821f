"""train and resume as library calls: input checked and data loaded before the run is touched,
then the run locked, its records started and the epochs trained. Under torchrun only rank 0
writes the run; every step that can fail is agreed on by all ranks, so no rank is left waiting."""

from __future__ import annotations

import contextlib
import functools
import platform
import sys
from collections.abc import Callable
from typing import Any

import torch

import cifarcam
from cifarcam.config import SIZED_TO_RUN, TrainConfig, batch_and_lr, config_to_json, data_dir_path
from cifarcam.data.datasets import load_dataset, split_train
from cifarcam.devices import precision_name, resolve_device, training_dtype
from cifarcam.errors import RunError, UsageError
from cifarcam.evaluation.loading import read_config
from cifarcam.runs.files import atomic_write_text
from cifarcam.runs.rundir import RunDir, now_iso
from cifarcam.training import resume as resumption
from cifarcam.training.distributed import SINGLE, Group
from cifarcam.training.loop import Prepared, State, StopSignal, TrainCallbacks, interrupted, train_loop

# What a run begins from: the state to train from (None: the start), or the records of a run
# that has nothing left to train
Beginning = tuple[State | None, list[dict[str, Any]] | None]


def train(
    config: TrainConfig,
    run: RunDir,
    overwrite: bool = False,
    command: str = "",
    callbacks: TrainCallbacks | None = None,
    stop: StopSignal | None = None,
    group: Group = SINGLE,
) -> list[dict[str, float]]:
    """Train a model as configured, writing config, meta, metrics and checkpoints into `run`."""
    config_to_json(config)  # what can fail is done before an earlier run is replaced
    group.from_main(run.refuse_nesting)

    def begin(prepared: Prepared, sized: TrainConfig) -> Beginning:
        run.start_training(overwrite)
        atomic_write_text(run.config_path, config_to_json(sized))
        environment = _environment(prepared, command, group)
        sized_to_run = [name for name in SIZED_TO_RUN if getattr(config, name) is None]
        run.update_meta(
            status="running", started_at=now_iso(), ended_at=None, sized_to_run=sized_to_run, **environment
        )
        return None, None

    return _load_lock_and_train(config, run, begin, callbacks, stop, group)


def resume(
    run: RunDir,
    command: str = "",
    callbacks: TrainCallbacks | None = None,
    stop: StopSignal | None = None,
    group: Group = SINGLE,
) -> list[dict[str, float]]:
    """Continue a run from its last saved state (or from the start if none was saved)."""
    config = group.from_main(lambda: read_config(run))
    # A changed config.json is refused before the data load, from the state file's header (and
    # again with the whole state, under the run's lock)
    group.from_main(lambda: resumption.check_same_config(run, config, run.read_state_meta()))

    begin = functools.partial(_begin_resume, run, command, group)
    return _load_lock_and_train(config, run, begin, callbacks, stop, group)


def _load_lock_and_train(
    config: TrainConfig,
    run: RunDir,
    begin: Callable[[Prepared, TrainConfig], Beginning],
    callbacks: TrainCallbacks | None,
    stop: StopSignal | None,
    group: Group,
) -> list[dict[str, float]]:
    """Load the data, size the batch and lr to it where unset, lock the run and `begin` it on
    rank 0, then train; the lock is held throughout."""
    prepared = group.agree(lambda: _prepare(config, group))
    batch_size, lr = batch_and_lr(config, len(prepared.train))
    config = config.model_copy(update={"batch_size": batch_size, "lr": lr})
    with contextlib.ExitStack() as held:

        def lock_and_begin() -> Beginning:
            if stop is not None and stop.signal is not None:  # while the data loaded: nothing touched
                raise interrupted(stop.signal, f"before training started; run '{run.name}' was not changed")
            held.enter_context(run.lock())
            return begin(prepared, config)

        state, finished = group.from_main(lock_and_begin)
        if finished is not None:
            return finished
        return train_loop(config, run, prepared, state, callbacks or TrainCallbacks(), stop, group)


def _begin_resume(
    run: RunDir, command: str, group: Group, prepared: Prepared, config: TrainConfig
) -> Beginning:
    """The saved state of `run` to continue from, with meta.json saying it runs again."""
    run.remove_temporaries()
    state = run.load_state()
    if state is None and (run.checkpoint_path("last").exists() or run.metrics_path.exists()):
        records = resumption.finished_without_state(run, config)
        if records is not None:  # nothing to resume; its results are all there
            return None, records
        raise RunError(  # starting over would replace its epochs without --overwrite
            f"run '{run.name}' has trained epochs but no training state to resume from "
            f"('{run.state_path}' is missing)",
            hint=f"train it again from the start with 'cifarcam train --run {run.name} --overwrite'",
        )
    if state is not None:
        resumption.check_same_config(run, config, state[1])
        if state[1]["epoch"] >= config.epochs and resumption.derived_files_saved(run, state):
            run.update_meta(status="finished")
            return state, list(state[1]["records"])
        # else also a run whose last epoch's state was saved but not all the files derived
        # from it (killed in between): train_loop writes them again from the state
    environment = _environment(prepared, command, group)
    if state is not None:
        resumption.check_same_data(run, state[1]["data"], environment)
    meta = run.read_meta() if run.meta_path.exists() else {}
    run.update_meta(
        status="running",
        started_at=meta.get("started_at") or now_iso(),
        resumed_at=[*meta.get("resumed_at", []), now_iso()],
        ended_at=None,
        error=None,
        **environment,
    )
    return state, None


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
