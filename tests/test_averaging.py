"""Weight EMA: the average by hand, the trainer evaluating and saving it, and exact resumption."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_cli import invoke
from torch import nn

from cifarcam.config import build_config
from cifarcam.data.datasets import CIFAR10_MEAN, CIFAR10_STD, synthetic_dataset
from cifarcam.devices import memory_format
from cifarcam.evaluation.inference import predict, score
from cifarcam.models.resnet import build_model
from cifarcam.training.ema import WeightAverage
from cifarcam.training.trainer import StopRequested, Trainer


def small_net() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 2, bias=False), nn.BatchNorm1d(2))


def set_weights(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        model[0].weight.fill_(value)
        model[1].running_mean.fill_(value)
        model[1].num_batches_tracked.fill_(int(value))


def test_average_by_hand() -> None:
    model = small_net()
    average = WeightAverage(model, decay=0.75, start_step=3)
    set_weights(model, 8.0)
    average.update(2)  # before the start: nothing happens
    assert not average.started and average.state() == {}
    average.update(3)  # the first averaged step copies
    set_weights(model, 4.0)
    average.update(4)  # 0.75 * 8 + 0.25 * 4 = 7
    set_weights(model, 3.0)
    average.update(5)  # 0.75 * 7 + 0.25 * 3 = 6
    averaged = average.model
    assert torch.equal(averaged[0].weight, torch.full((2, 2), 6.0))
    assert torch.equal(averaged[1].running_mean, torch.full((2,), 6.0))
    assert int(averaged[1].num_batches_tracked) == 3  # counters are copied, not averaged
    assert torch.equal(model[0].weight, torch.full((2, 2), 3.0))  # the live model is untouched


def test_state_round_trip() -> None:
    model = small_net()
    average = WeightAverage(model, decay=0.5, start_step=0)
    set_weights(model, 2.0)
    average.update(0)
    restored = WeightAverage(small_net(), decay=0.5, start_step=0)
    restored.load_state(average.state())
    assert restored.started
    expected = average.state()
    assert all(torch.equal(value, expected[key]) for key, value in restored.state().items())
    restored.load_state({})
    assert not restored.started


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5])
def test_decay_outside_zero_one_is_refused(decay: float) -> None:
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(small_net(), decay=decay, start_step=0)


def make_trainer(ema_decay: float, seed: int = 5) -> Trainer:
    data = synthetic_dataset(192, 64, seed=1)
    config = build_config(
        {"width": 4, "epochs": 4, "batch_size": 32, "lr": 0.1, "ema_decay": ema_decay, "ema_start": 0.5}
    )
    torch.manual_seed(seed)
    model = build_model("resnet18", 4).to(memory_format=memory_format(channels_last=True))
    return Trainer(model, data.train, data.test, config, CIFAR10_MEAN, CIFAR10_STD)


def test_trainer_evaluates_the_average_once_it_starts() -> None:
    trainer = make_trainer(0.9)
    records = list(trainer.epochs())
    assert trainer.average is not None and trainer.average.started
    assert trainer.final_model is trainer.average.model
    # 6 steps per epoch, averaging from step 12: the average differs from the live weights
    live = trainer.model.state_dict()
    averaged = trainer.final_model.state_dict()
    assert not torch.equal(live["linear.weight"], averaged["linear.weight"])
    logits = predict(trainer.final_model, trainer.test.images, CIFAR10_MEAN, CIFAR10_STD)
    assert records[-1]["test_acc"] == score(logits, trainer.test.labels)["acc"]
    # without EMA the same seed trains the same live weights: the average does not alter training
    plain = make_trainer(0.0)
    list(plain.epochs())
    assert plain.final_model is plain.model
    assert all(torch.equal(v, plain.model.state_dict()[k]) for k, v in live.items())


def test_stop_after_the_average_started_resumes_exactly() -> None:
    reference = make_trainer(0.9)
    list(reference.epochs())

    steps = 0

    def stop_at_step_15() -> bool:
        nonlocal steps
        steps += 1
        return steps == 15  # epoch 3, step 3: after the average started at step 12

    stopped = make_trainer(0.9)
    with pytest.raises(StopRequested):
        list(stopped.epochs(should_stop=stop_at_step_15))
    tensors, meta = stopped.state()
    assert any(key.startswith("average.") for key in tensors)
    resumed = make_trainer(0.9, seed=99)  # other initial weights: everything must come from the state
    resumed.load_state(tensors, json.loads(json.dumps(meta)))
    list(resumed.epochs())
    expected = reference.final_model.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in resumed.final_model.state_dict().items())


def test_train_with_ema_saves_the_average(synthetic_tree: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    common = ["--run", "ema", "--runs-dir", str(runs)]
    result = invoke(
        "train", *common, "--data", str(synthetic_tree), "--width", "4", "--epochs", "2",
        "--batch-size", "64", "--device", "cpu", "--ema-decay", "0.8",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    run = runs / "ema"
    assert json.loads((run / "config.json").read_text())["ema_decay"] == 0.8
    checkpoint = load_file(run / "checkpoints" / "last.safetensors")
    state = load_file(run / "checkpoints" / "state.safetensors")
    averaged = {k.removeprefix("average."): v for k, v in state.items() if k.startswith("average.")}
    assert averaged and all(torch.equal(checkpoint[k], v) for k, v in averaged.items())
    assert not torch.equal(checkpoint["linear.weight"], state["model.linear.weight"])
    # evaluate scores the saved average: the same accuracy as the last epoch's record
    assert invoke("evaluate", *common, "--no-tta").exit_code == 0
    evaluation = json.loads((run / "evaluation.json").read_text())
    last = json.loads((run / "metrics.json").read_text())["epochs"][-1]
    assert evaluation["accuracy"] == pytest.approx(last["test_acc"])
