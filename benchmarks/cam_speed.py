"""Grad-CAM over a whole test set: cifarcam vs pytorch-grad-cam vs a plain forward pass, one run.

For each layer, the same model (float32, channels_last, as `cifarcam gradcam` loads it), images
(batches of --batch-size, float32, NCHW) and target classes (the model's predictions, computed
beforehand and not timed) go through:
(a) a plain forward pass under torch.inference_mode (the floor),
(b) cifarcam's CamExtractor as `cifarcam gradcam --all` runs it (fast=True, compiled=True:
    below the layer a copy with BatchNorm folded into the convolutions, channels_last, compiled
    by torch.compile with frozen weights, its compile time included; autograd only from the
    layer up; maps upsampled and scaled), and (b') the same without the copy (fast=False),
(c) pytorch-grad-cam's GradCAM (its usual full backward, maps upsampled and scaled),
and, where the CPU has bf16 (or on CUDA), (a) and (b) again under bfloat16 autocast in
channels_last (`cifarcam gradcam --precision bf16`).
The passes are interleaved: the batches are cut into 5 rounds, and each round runs every pass
in an order rotated from round to round, so the machine's changing speed (it is shared) falls
on all of them alike; each pass's seconds are summed over the rounds.
The float32 maps of (b) and (c) are compared over all images (after cifarcam's conventions);
for bf16 the largest difference from the float32 maps is printed.

Prints seconds and the two ratios of the targets: pytorch-grad-cam / cifarcam (>= 3.5) and
cifarcam / forward (<= 1.25), for float32 and for bf16.
Usage: python benchmarks/cam_speed.py [--data PATH] [--run runs/NAME] [--width 64] [--limit N]
"""

from __future__ import annotations

import argparse
import copy
import platform
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from cifarcam.data.datasets import CIFAR10_MEAN, CIFAR10_STD, load_dataset, normalize, synthetic_dataset
from cifarcam.devices import autocast_dtype
from cifarcam.explain.extractor import CamExtractor, normalize_maps
from cifarcam.models.resnet import build_model
from cifarcam.runs.rundir import RunDir


def load_inputs(data: str | None, limit: int) -> tuple[torch.Tensor, str]:
    if data:
        test = load_dataset(data, None).test
        source = f"test set of {data}"
    else:
        test = synthetic_dataset(10, limit, seed=0).test
        source = "synthetic images"
    images = test.images[:limit]
    return normalize(images, CIFAR10_MEAN, CIFAR10_STD).float(), f"{len(images)} {source}"


def load_model(run: str | None, width: int) -> tuple[torch.nn.Module, str]:
    if run:
        path = Path(run)
        model, info = RunDir(path.parent, path.name).load_model("last")
        model = model.float()
        described = f"trained run {run} (ResNet18 width {info.width})"
    else:
        torch.manual_seed(0)
        model, described = build_model("resnet18", width), f"seeded ResNet18 width {width}"
    # in channels_last, as `cifarcam gradcam` loads it (LoadedRun.cam_model)
    return model.to(memory_format=torch.channels_last).eval(), described


ROUNDS = 5


def timed(action: Callable[[], None]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="image-folder tree or 'cifar10' (default: synthetic images)")
    parser.add_argument("--run", help="a run directory whose last checkpoint to explain")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--limit", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--layers", nargs="+", default=["layer4", "layer3"])
    args = parser.parse_args()

    x, source = load_inputs(args.data, args.limit)
    model, described = load_model(args.run, args.width)
    batches = list(x.split(args.batch_size))
    with torch.no_grad():  # not inference_mode: these classes are used under autograd later
        classes = [model(batch).argmax(1) for batch in batches]
    print(f"{described}, channels_last; {source}; batch {args.batch_size}; float32 NCHW images")
    print(
        f"CPU: {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )

    amp = autocast_dtype(torch.device("cpu"), "auto")
    fast_model = copy.deepcopy(model).to(memory_format=torch.channels_last)

    def forward(net: torch.nn.Module, dtype: torch.dtype | None, chunk: range) -> None:
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=dtype is not None):
            for index in chunk:
                net(batches[index])

    def cam_pass(cam: CamExtractor, layer: str, out: list[torch.Tensor], chunk: range) -> None:
        for index in chunk:
            out.append(cam(batches[index], {"pred": classes[index]}).maps["pred"]["gradcam"][layer])

    def plain_pass(layer: str, out: list[torch.Tensor], chunk: range) -> None:
        with CamExtractor(model, [layer]) as cam:
            cam_pass(cam, layer, out, chunk)

    def reference_pass(module: torch.nn.Module, out: list[torch.Tensor], chunk: range) -> None:
        with GradCAM(model=model, target_layers=[module]) as cam:
            for index in chunk:
                targets = [ClassifierOutputTarget(int(c)) for c in classes[index]]
                out.append(torch.from_numpy(cam(input_tensor=batches[index], targets=targets)))

    def interleaved(passes: dict[str, Callable[[range], None]]) -> dict[str, float]:
        """Seconds per pass over all batches, run in ROUNDS rounds of consecutive batches with the
        order of the passes rotated each round, so that a slower or faster spell of this shared
        machine falls on every pass alike."""
        seconds = dict.fromkeys(passes, 0.0)
        bounds = [round(len(batches) * r / ROUNDS) for r in range(ROUNDS + 1)]
        for r in range(ROUNDS):
            chunk = range(bounds[r], bounds[r + 1])
            names = list(passes)
            for name in names[r % len(names) :] + names[: r % len(names)]:
                seconds[name] += timed(partial(passes[name], chunk))
        return seconds

    forward(model, None, range(1))  # warm-up
    count = sum(len(b) for b in batches)
    for layer in args.layers:
        ours: list[torch.Tensor] = []
        ours_bf16: list[torch.Tensor] = []
        ours_plain: list[torch.Tensor] = []
        theirs: list[torch.Tensor] = []
        # The fast extractor stays open over all rounds, as in one `cifarcam gradcam` command (it
        # compiles once); the others open per round. Its folded copy carries no hooks, so
        # pytorch-grad-cam's hooks on the model's layer never fire inside it.
        with CamExtractor(model, [layer], fast=True, compiled=True) as fast_cam:
            seconds = interleaved(
                {
                    "forward": partial(forward, model, None),
                    "cifarcam": partial(cam_pass, fast_cam, layer, ours),
                    "cifarcam plain": partial(plain_pass, layer, ours_plain),
                    "pytorch-grad-cam": partial(reference_pass, dict(model.named_modules())[layer], theirs),
                }
            )
        model.zero_grad(set_to_none=True)  # pytorch-grad-cam leaves gradients in the parameters
        reference = torch.cat([normalize_maps(m, tuple(m.shape[1:])) for m in theirs])
        difference = (torch.cat(ours) - reference).abs().max().item()
        plain_difference = (torch.cat(ours_plain) - reference).abs().max().item()
        speedup = seconds["pytorch-grad-cam"] / seconds["cifarcam"]
        print(
            f"{layer}, float32: forward {seconds['forward']:.1f} s, cifarcam {seconds['cifarcam']:.1f} s "
            f"(without the folded copy {seconds['cifarcam plain']:.1f} s), "
            f"pytorch-grad-cam {seconds['pytorch-grad-cam']:.1f} s for {count} images; "
            f"max |difference| from pytorch-grad-cam over all maps: {difference:.2e} "
            f"(without the folded copy {plain_difference:.2e})"
        )
        print(
            f"  speed-up over pytorch-grad-cam: {speedup:.2f}x (target >= 3.5; without the folded copy "
            f"{seconds['pytorch-grad-cam'] / seconds['cifarcam plain']:.2f}x); "
            f"cifarcam / forward: {seconds['cifarcam'] / seconds['forward']:.2f}x (target <= 1.25)"
        )
        if amp is None:
            print("  (no bf16 on this CPU: bf16 rows skipped)")
            continue
        with CamExtractor(fast_model, [layer], amp_dtype=amp) as bf16_cam:
            seconds |= interleaved(
                {
                    "forward bf16": partial(forward, fast_model, amp),
                    "cifarcam bf16": partial(cam_pass, bf16_cam, layer, ours_bf16),
                }
            )
        per_image = torch.cat(
            [(a - b).abs().flatten(1).amax(1) for a, b in zip(ours, ours_bf16, strict=True)]
        )
        print(
            f"{layer}, bf16 autocast, channels_last: forward {seconds['forward bf16']:.1f} s, "
            f"cifarcam {seconds['cifarcam bf16']:.1f} s; per-image max |bf16 map - float32 map|: "
            f"median {per_image.median():.3f}, 99th percentile {per_image.quantile(0.99):.3f}, "
            f"largest {per_image.max():.3f}; {int((per_image > 0.1).sum())} of {count} images above 0.1"
        )
        print(
            f"  speed-up over pytorch-grad-cam (float32): "
            f"{seconds['pytorch-grad-cam'] / seconds['cifarcam bf16']:.2f}x (target >= 3.5); "
            f"cifarcam / forward (both bf16): {seconds['cifarcam bf16'] / seconds['forward bf16']:.2f}x "
            "(target <= 1.25)"
        )


if __name__ == "__main__":
    main()
