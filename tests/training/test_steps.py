from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_train_args
from torch import nn

from cifarcam.config import AugmentConfig, TrainConfig, build_config
from cifarcam.data.datasets import Split, normalize, synthetic_dataset
from cifarcam.devices import FP16_LOSS_SCALE, autocast_dtype, training_dtype
from cifarcam.errors import ConfigError
from cifarcam.evaluation.inference import predict, score
from cifarcam.models.folding import scoring_model
from cifarcam.models.resnet import BasicBlock, build_model
from cifarcam.training.steps import (
    Tally,
    device_batches,
    make_optimizer,
    one_cycle,
    train_one_epoch,
    train_steps,
)
from cifarcam.training.trainer import Trainer, epoch_order

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def fit(
    model: nn.Module,
    train: Split,
    test: Split,
    config: TrainConfig,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    amp_dtype: torch.dtype | None = None,
) -> Iterator[dict[str, float]]:
    """Train for config.epochs from scratch, yielding one metrics record per epoch."""
    return Trainer(model, train, test, config, mean, std, amp_dtype=amp_dtype).epochs()


def linear_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))


def test_train_loss_is_the_per_sample_mean_over_uneven_batches() -> None:
    data = synthetic_dataset(23, 1)
    model = linear_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    no_augment = AugmentConfig(flip=False, translate=0, cutout=0)
    batches = device_batches(data.train, torch.arange(23), 10, MEAN, STD, no_augment, torch.Generator())
    result = train_one_epoch(
        model, optimizer, scheduler, batches, 3, torch.device("cpu"), channels_last=False
    )
    with torch.no_grad():
        logits = model(normalize(data.train.images, MEAN, STD))
    expected = F.cross_entropy(logits, data.train.labels).item()
    # A mean of the three batch means (10, 10, 3 samples) would differ from this.
    batch_means = [
        F.cross_entropy(logits[i : i + 10], data.train.labels[i : i + 10]).item() for i in (0, 10, 20)
    ]
    assert abs(sum(batch_means) / 3 - expected) > 1e-3
    assert result["train_loss"] == pytest.approx(expected, rel=1e-5)
    assert result["train_acc"] == pytest.approx((logits.argmax(1) == data.train.labels).float().mean().item())


class AutotuneRecorder(nn.Module):
    """Wraps a model; notes cuDNN's benchmark flag in each forward pass and in its backward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.forward_flags: list[tuple[int, bool]] = []
        self.backward_flags: list[tuple[int, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        self.forward_flags.append((rows, torch.backends.cudnn.benchmark))
        out = self.model(x)
        if out.requires_grad:
            out.register_hook(lambda grad: self.backward_flags.append((rows, torch.backends.cudnn.benchmark)))
        return out


def test_only_full_batches_and_chunks_use_cudnn_benchmark_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    data = synthetic_dataset(23, 7)
    model = AutotuneRecorder(linear_model())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    no_augment = AugmentConfig(flip=False, translate=0, cutout=0)
    batches = device_batches(data.train, torch.arange(23), 10, MEAN, STD, no_augment, torch.Generator())
    tally = Tally.zeros(torch.device("cpu"))
    assert train_steps(model, optimizer, scheduler, batches, tally, 3, channels_last=False, autotune_rows=10)
    expected = [(10, True), (10, True), (3, False)]
    assert model.forward_flags == expected and model.backward_flags == expected
    assert torch.backends.cudnn.benchmark  # put back
    model.forward_flags.clear()
    predict(model, data.test.images, MEAN, STD, batch_size=3, channels_last=False)  # 7 images
    assert model.forward_flags == [(3, True), (3, True), (1, False)]
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # as configured: never on
    model.forward_flags.clear()
    predict(model, data.test.images, MEAN, STD, batch_size=3, channels_last=False)
    assert model.forward_flags == [(3, False), (3, False), (1, False)]


def test_norm_and_bias_weight_decay_switch() -> None:
    model = build_model("resnet18", 4)
    groups = make_optimizer(model, build_config({"decay_norm_and_bias": False}), 0.4).param_groups
    assert [g["weight_decay"] for g in groups] == [5e-4, 0.0]
    assert all(p.ndim == 4 or p.ndim == 2 for p in groups[0]["params"])
    assert all(p.ndim == 1 for p in groups[1]["params"])
    assert len(make_optimizer(model, build_config({}), 0.4).param_groups) == 1


@pytest.mark.parametrize(
    ("transform", "problem"),
    [
        ("scale", "the albumentations pipeline must keep 32x32x3 uint8 images (it made (48, 48, 3) uint8)"),
        ("crop", "the albumentations pipeline failed (CropSizeError: Crop size (height, width) exceeds"),
    ],
)
def test_a_pipeline_failing_in_a_worker_raises_one_line_naming_the_image(
    transform: str, problem: str
) -> None:
    """The config's probe draws catch most bad pipelines; one that slips through still ends the
    epoch with one line, not a worker's traceback."""
    import albumentations as A

    from cifarcam.data.albumentations import albumentations_batches

    data = synthetic_dataset(64, 32, seed=4)
    bad = A.RandomScale(scale_limit=(0.5, 0.5), p=1) if transform == "scale" else A.RandomCrop(64, 64)
    pipeline = A.to_dict(A.Compose([A.HorizontalFlip(p=0.5), bad]))
    order = torch.tensor([5, 7, 9])
    with pytest.raises(ConfigError) as raised:
        list(albumentations_batches(data.train, order, pipeline, 2, 1, seed=3))
    assert raised.value.message.startswith(f"image 5 of the training split: {problem}"), raised.value.message
    assert "\n" not in raised.value.message


def test_albumentations_path_trains_and_is_seeded() -> None:
    from cifarcam.data.albumentations import albumentations_batches, seed_project_pipeline

    data = synthetic_dataset(64, 32, seed=4)
    pipeline = seed_project_pipeline()
    order = torch.randperm(64)[:40]
    batches = list(albumentations_batches(data.train, order, pipeline, 16, 0, seed=3))
    first = [x for x, _ in batches]
    again = [x for x, _ in albumentations_batches(data.train, order, pipeline, 16, 0, seed=3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert torch.equal(torch.cat([y for _, y in batches]), data.train.labels[order])  # in that order
    assert first[0].dtype == torch.uint8 and first[0].shape == (16, 3, 32, 32)
    config = build_config(
        {"epochs": 1, "batch_size": 16, "lr": 0.05, "albumentations": pipeline, "workers": 1}
    )
    torch.manual_seed(0)
    records = list(fit(build_model("resnet18", 4), data.train, data.test, config, MEAN, STD))
    assert records[0]["train_loss"] > 0 and 0 <= records[0]["test_acc"] <= 1


def test_epoch_order_goes_through_every_image_in_turn() -> None:
    epochs = [epoch_order(10, 4, seed=3, epoch=e) for e in range(1, 6)]
    assert [len(e) for e in epochs] == [4] * 5
    stream = torch.cat(epochs)  # 20 positions: two whole shuffles, the third epoch straddles them
    assert sorted(stream[:10].tolist()) == list(range(10)) == sorted(stream[10:].tolist())
    assert not torch.equal(stream[:10], stream[10:])
    assert torch.equal(epoch_order(10, 4, seed=3, epoch=3), epochs[2])
    # Whole-set epochs are the same stream cut at every shuffle: epoch e is shuffle e.
    whole = [epoch_order(10, 10, seed=3, epoch=e) for e in (1, 2)]
    assert torch.equal(torch.cat(whole), stream)
    assert not torch.equal(epoch_order(10, 10, seed=4, epoch=1), whole[0])
    # An epoch larger than the set: two whole shuffles and half of a third.
    counts = torch.bincount(epoch_order(10, 25, seed=3, epoch=1), minlength=10)
    assert sorted(counts.tolist()) == [2] * 5 + [3] * 5


def test_score_is_per_sample() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    labels = torch.tensor([0, 0, 0])
    result = score(logits, labels)
    assert result["loss"] == pytest.approx(F.cross_entropy(logits, labels).item())
    assert result["acc"] == pytest.approx(2 / 3)


def test_one_cycle_rises_then_falls_to_zero() -> None:
    factor = one_cycle(100, 0.2)
    assert factor(0) == pytest.approx(0.1)
    assert factor(20) == pytest.approx(1.0)
    assert factor(60) == pytest.approx(0.5)
    assert factor(100) == 0.0


def test_predict_restores_mode_and_tta_views_average() -> None:
    model = build_model("resnet18", 4).train()
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    plain = predict(model, images, MEAN, STD, batch_size=2)
    assert model.training and plain.shape == (5, 10)
    flipped = predict(model, images.flip(3), MEAN, STD, batch_size=2)
    both = predict(model, images, MEAN, STD, batch_size=2, tta="flip")
    assert torch.allclose(both, (plain + flipped) / 2, atol=1e-5)
    assert predict(model, images, MEAN, STD, tta="flip-translate").shape == (5, 10)


def test_known_plain_logits_stand_in_for_the_first_tta_view() -> None:
    model = batchnorm_resnet(4)
    images = torch.randint(0, 256, (7, 3, 32, 32), dtype=torch.uint8)
    plain = predict(model, images, MEAN, STD, batch_size=3)
    full = predict(model, images, MEAN, STD, batch_size=3, tta="flip-translate")
    reused = predict(model, images, MEAN, STD, batch_size=3, tta="flip-translate", plain_logits=plain)
    torch.testing.assert_close(reused, full, rtol=0, atol=1e-6)
    # they are used, not scored again: zeros in their place take one sixth of them out
    zeros = predict(model, images, MEAN, STD, batch_size=3, tta="flip-translate", plain_logits=plain * 0)
    torch.testing.assert_close(zeros, full - plain / 6, rtol=1e-5, atol=1e-5)


def batchnorm_resnet(width: int) -> nn.Module:
    """A ResNet18 in eval mode whose BatchNorm layers hold statistics and affine weights far
    from their initial ones, so that folding them into the convolutions changes the weights."""
    torch.manual_seed(0)
    model = build_model("resnet18", width)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.3, 0.3)
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.2, 3.0)
    return model.eval()


def test_folded_scoring_gives_the_logits_of_the_model_as_trained() -> None:
    model = batchnorm_resnet(8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8)
    for tta in ("none", "flip-translate"):
        folded = predict(model, images, MEAN, STD, batch_size=5, tta=tta)
        plain = predict(model, images, MEAN, STD, batch_size=5, tta=tta, fold=False)
        assert not torch.equal(folded, plain)  # a different computation...
        assert torch.allclose(folded, plain, rtol=1e-4, atol=1e-4)  # ...of the same function
        assert torch.equal(folded.argmax(1), plain.argmax(1))
    with torch.no_grad():
        direct = model(normalize(images, MEAN, STD))
    assert torch.allclose(predict(model, images, MEAN, STD), direct, rtol=1e-4, atol=1e-4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is untouched


def test_only_batchnorm_resnets_in_eval_mode_are_folded() -> None:
    model = batchnorm_resnet(4)
    folded = scoring_model(model, torch.channels_last)
    assert folded is not model
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert folded.get_parameter("conv1.weight").is_contiguous(memory_format=torch.channels_last)
    assert scoring_model(model.train()) is model  # training mode: batch statistics, nothing to fold
    group_norm = build_model("resnet18", 4, norm="group").eval()
    assert scoring_model(group_norm) is group_norm
    wrapped = nn.Sequential(batchnorm_resnet(4))  # not a ResNet: its forward may do more than compute
    assert scoring_model(wrapped) is wrapped


def test_fit_learns_synthetic_classes_and_yields_flat_records() -> None:
    data = synthetic_dataset(400, 200, seed=4)
    torch.manual_seed(0)
    model = build_model("resnet18", 8)
    config = build_config({"epochs": 3, "batch_size": 50, "lr": 0.05, "width": 8})
    records = list(fit(model, data.train, data.test, config, MEAN, STD))
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert set(records[0]) == {
        "epoch",
        "lr",
        "train_loss",
        "train_acc",
        "test_loss",
        "test_acc",
        "epoch_time_s",
        "eval_time_s",
    }
    assert records[-1]["test_acc"] > 0.5  # 10 classes: chance is 0.1


def test_fit_is_reproducible_under_a_seed() -> None:
    data = synthetic_dataset(100, 20, seed=4)
    config = build_config({"epochs": 1, "batch_size": 25, "lr": 0.05, "width": 4, "augment": {"cutout": 8}})
    states = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model("resnet18", 4)
        list(fit(model, data.train, data.test, config, MEAN, STD, amp_dtype=torch.bfloat16))
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


@pytest.mark.parametrize("fold", [True, False])
def test_bf16_forward_matches_fp32_within_tolerance(fold: bool) -> None:
    model = batchnorm_resnet(16)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    fp32 = predict(model, images, MEAN, STD, fold=fold)
    bf16 = predict(model, images, MEAN, STD, amp_dtype=torch.bfloat16, fold=fold)
    probs32, probs16 = fp32.softmax(1), bf16.softmax(1)
    assert (probs32 - probs16).abs().max().item() < 0.05
    assert (fp32 - bf16).abs().max().item() < 0.1 * fp32.abs().max().item() + 0.05


def test_splits_are_dataclasses_of_tensors() -> None:
    split = Split(torch.zeros(3, 3, 32, 32, dtype=torch.uint8), torch.tensor([0, 1, 2]))
    assert len(split.select(torch.tensor([2]))) == 1


class NanAfter(nn.Module):
    """A ResNet whose training forward passes turn NaN from the `after`-th one on (fault injection)."""

    def __init__(self, after: int, width: int = 4) -> None:
        super().__init__()
        self.inner = build_model("resnet18", width)
        self.after = after
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        if self.training:
            self.calls += 1
            if self.calls >= self.after:
                out = out * float("nan")
        return out


def test_divergence_names_epoch_and_step() -> None:
    from cifarcam.errors import TrainingDiverged

    data = synthetic_dataset(100, 20, seed=4)
    config = build_config({"epochs": 3, "batch_size": 25, "lr": 0.05, "width": 4})
    trainer = Trainer(NanAfter(after=7), data.train, data.test, config, MEAN, STD)
    epochs = trainer.epochs()
    assert next(epochs)["epoch"] == 1  # 4 steps of 25: fine
    with pytest.raises(TrainingDiverged) as caught:
        next(epochs)
    assert caught.value.message == "training diverged: the loss became NaN or infinite at epoch 2, step 3"
    assert caught.value.hint == "try a lower learning rate (--lr, now 0.05)"


def test_divergence_keeps_the_last_good_checkpoint_and_marks_the_run_failed(
    tmp_path, synthetic_tree, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from typer.testing import CliRunner

    import cifarcam.training.loop as runloop
    from cifarcam.cli import app

    monkeypatch.setattr(
        runloop, "build_model", lambda name, width, classes, norm: NanAfter(after=6, width=width)
    )
    runs = tmp_path / "runs"
    result = CliRunner().invoke(
        app,
        tiny_train_args(runs, synthetic_tree, epochs=3),
    )
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "Error: training diverged: the loss became NaN or infinite at epoch 2, step 2",
        "Hint: try a lower learning rate (--lr, now 0.078125)",
    ]
    meta = json.loads((runs / "r" / "meta.json").read_text())
    assert meta["status"] == "failed" and meta["error"].startswith("training diverged")
    assert [e["epoch"] for e in json.loads((runs / "r" / "metrics.json").read_text())["epochs"]] == [1]
    from safetensors.torch import load_file

    weights = load_file(runs / "r" / "checkpoints" / "last.safetensors")
    assert all(torch.isfinite(w.float()).all() for w in weights.values())


@pytest.mark.parametrize("width", [4, 8])
def test_fp32_channels_last_training_on_cpu_with_narrow_projection_shortcuts(width: int) -> None:
    """In torch 2.14.1 oneDNN's weight gradient of a strided 1x1 convolution in channels_last
    hung (AVX2: 2 threads spinning; width 4, batch 33, on a 2-core EPYC) or corrupted the heap
    (AVX-512 Xeon: widths 4 and 8, batches 7, 25, 33) when the input had fewer channels than
    its block; the models subsample before a stride-1 projection instead. Run in a subprocess
    with a time limit, so a hang or a crash fails this test rather than the whole session; the
    gradients of each convolution are also checked against float64, since the same bug gave
    wrong ones on other machines."""
    import subprocess
    import sys

    script = (
        "import torch, torch.nn.functional as F\n"
        "from cifarcam.config import build_config\n"
        "from cifarcam.data.datasets import synthetic_dataset\n"
        "from cifarcam.training.trainer import Trainer\n"
        "from cifarcam.models.resnet import build_model\n"
        "from cifarcam.devices import memory_format\n"
        f"width = {width}\n"
        "layout = memory_format(channels_last=True)\n"
        "assert layout == torch.channels_last\n"
        "data = synthetic_dataset(99, 20, seed=4)\n"
        "epochs = []\n"
        "for batch in (7, 33):  # sizes that crashed on the Xeon\n"
        "    config = build_config({'epochs': 2, 'batch_size': batch, 'width': width, 'lr': 0.05})\n"
        "    model = build_model('resnet18', width).to(memory_format=layout)\n"
        "    trainer = Trainer(model, data.train, data.test, config, (0.5,) * 3, (0.25,) * 3)\n"
        "    epochs.append(len(list(trainer.epochs())))\n"
        "# every convolution of the model, on the input it gets, against float64 NCHW\n"
        "inputs = {}\n"
        "convs = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}\n"
        "hooks = [m.register_forward_hook(lambda m, i, o, n=n: inputs.__setitem__(n, i[0].detach()))\n"
        "         for n, m in convs.items()]\n"
        "model(torch.randn(25, 3, 32, 32).contiguous(memory_format=layout))\n"
        "worst = 0.0\n"
        "for name, conv in convs.items():\n"
        "    x = inputs[name]\n"
        "    assert x.stride(1) == 1, name  # channels innermost: the model ran in channels_last\n"
        "    out_grad = torch.randn_like(conv(x))\n"
        "    grads = []\n"
        "    for dtype, fmt in ((torch.float64, torch.contiguous_format), (torch.float32, layout)):\n"
        "        xi = x.to(dtype).contiguous(memory_format=fmt).requires_grad_()\n"
        "        w = conv.weight.detach().to(dtype).contiguous(memory_format=fmt).requires_grad_()\n"
        "        F.conv2d(xi, w, None, conv.stride, conv.padding).backward(out_grad.to(dtype))\n"
        "        grads.append((xi.grad, w.grad))\n"
        "    for ref, got in zip(*grads):\n"
        "        worst = max(worst, float((got.double() - ref).abs().max() / ref.abs().max()))\n"
        "print(epochs, worst)\n"
    )
    try:
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail(f"fp32 channels_last training at width {width} hung (no result in 240 s)")
    assert result.returncode == 0, result.stderr[-2000:]
    epochs, worst = result.stdout.rsplit(" ", 1)
    assert epochs == "[2, 2]"
    assert float(worst) < 1e-4  # every convolution's input and weight gradients, in fp32 channels_last


def test_projection_shortcut_is_a_strided_1x1_convolution() -> None:
    """On the CPU the shortcut subsamples, then convolves with stride 1, which computes what the
    strided convolution would; on other devices the convolution strides itself, and moving the
    block back and forth switches between the two."""
    torch.manual_seed(0)
    block = BasicBlock(6, 12, stride=2).eval()
    conv, norm = block.shortcut[0], block.shortcut[1]
    assert (block.subsample, conv.stride) == (2, (1, 1))
    block.to("meta")
    assert (block.subsample, conv.stride) == (1, (2, 2))
    block.to_empty(device="cpu")
    assert (block.subsample, conv.stride) == (2, (1, 1))
    # a whole model's move reaches every block; so does loading tensors in place of the meta ones
    model = build_model("resnet18", 4)
    state = model.state_dict()
    model.to("meta")
    projections = [b for b in model.modules() if isinstance(b, BasicBlock) and b.stride > 1]
    assert len(projections) == 3 and all(b.subsample == 1 for b in projections)
    model.load_state_dict(state, assign=True)
    assert all((b.subsample, b.shortcut[0].stride) == (2, (1, 1)) for b in projections)
    torch.manual_seed(0)
    block = BasicBlock(6, 12, stride=2).eval()
    conv, norm = block.shortcut[0], block.shortcut[1]
    x = torch.randn(3, 6, 9, 9)  # odd size: the last row and column are kept by both
    expected = block.relu(
        block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x)))))
        + norm(F.conv2d(x, conv.weight, stride=2))
    )
    assert torch.allclose(block(x), expected, atol=1e-6)


def test_fp16_training_scales_the_loss_and_leaves_true_gradients() -> None:
    """fp16 steps backpropagate the loss times FP16_LOSS_SCALE, then divide the gradients by it."""
    data = synthetic_dataset(16, 1)
    no_augment = AugmentConfig(flip=False, translate=0, cutout=0)
    images = normalize(data.train.images, MEAN, STD)
    model = linear_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    seen: list[torch.Tensor] = []
    model[1].weight.register_hook(lambda grad: seen.append(grad.clone()))  # before the division
    batches = device_batches(data.train, torch.arange(16), 16, MEAN, STD, no_augment, torch.Generator())
    tally = Tally.zeros(torch.device("cpu"))
    train_steps(model, optimizer, scheduler, batches, tally, 1, amp_dtype=torch.float16, channels_last=False)
    with torch.autocast("cpu", dtype=torch.float16):
        logits = model(images)
    expected = torch.autograd.grad(F.cross_entropy(logits.float(), data.train.labels), model[1].weight)[0]
    assert model[1].weight.grad is not None
    torch.testing.assert_close(seen[0], expected * FP16_LOSS_SCALE, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(model[1].weight.grad, expected, rtol=2e-2, atol=1e-6)


def test_precision_names_map_to_autocast_dtypes() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # no CUDA call is needed for these
    assert training_dtype(cuda, "auto") == torch.float16  # runs train in fp16 on CUDA
    assert autocast_dtype(cuda, "fp16") == torch.float16
    assert training_dtype(cuda, "fp32") is None and autocast_dtype(cpu, "fp32") is None
    assert autocast_dtype(cpu, "bf16") == torch.bfloat16
    # On a CPU, fp16 (a run trained on CUDA, scored here) means what auto means.
    assert autocast_dtype(cpu, "fp16") == autocast_dtype(cpu, "auto") == training_dtype(cpu, "auto")
