"""Where a CUDA training step's time goes, measured in one run on one GPU.

For each batch size: cifarcam's own training loop (`train_one_epoch` over `device_batches`,
on-device flip + translate, channels_last, cuDNN benchmark mode, autocast as `cifarcam train
--precision P` sets it: auto is fp16 on CUDA) run eagerly and with the forward/backward
replayed from CUDA graphs (`GraphedTraining`), in alternating rounds; images/s and ms per step,
medians.
Then a profile of eager steps at the default batch (host time against the GPU's kernel time: a
step whose kernels take much less than its wall time waits on the host's launches), and the
ceiling: a large bf16 matrix product's TFLOP/s over the model's training FLOPs per image
(torch.utils.flop_counter).

Usage: python benchmarks/gpu_step.py [--width 64] [--batch-sizes 256,512,1024] [--steps 40]
CPU dry run of the flow (no graphs): python benchmarks/gpu_step.py --device cpu --width 8 --steps 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from workload import fake_cifar, training_flops_per_image

from cifarcam.config import AugmentConfig
from cifarcam.data.datasets import CIFAR10_MEAN, CIFAR10_STD
from cifarcam.devices import memory_format, training_dtype
from cifarcam.models.resnet import build_model
from cifarcam.training.cuda_graphs import GraphedTraining
from cifarcam.training.steps import device_batches, one_cycle, train_one_epoch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_tflops(device: torch.device, size: int) -> float:
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, generator=generator).bfloat16()
    b = torch.randn(size, size, device=device, generator=generator).bfloat16()
    times = []
    for _ in range(8):
        sync(device)
        started = time.perf_counter()
        torch.matmul(a, b)
        sync(device)
        times.append(time.perf_counter() - started)
    return 2 * size**3 / statistics.median(times[2:]) / 1e12


class Setup:
    """One model, optimizer and dataset on the device; `run` times `steps` training steps."""

    def __init__(
        self,
        device: torch.device,
        width: int,
        batch_size: int,
        steps: int,
        graphs: bool,
        precision: str = "auto",
    ) -> None:
        self.device, self.batch_size = device, batch_size
        self.amp = training_dtype(device, precision)
        torch.manual_seed(0)
        layout = memory_format(True)
        self.model: torch.nn.Module = build_model("resnet18", width).to(device).to(memory_format=layout)
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=0.05, momentum=0.9, nesterov=True, foreach=True
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, one_cycle(10**6, 0.2))
        self.data = fake_cifar(batch_size * steps).to(device)
        self.generator = torch.Generator(device=device).manual_seed(1)
        self.forward: torch.nn.Module = self.model
        if graphs:
            self.forward = GraphedTraining(self.model, batch_size, self.amp)

    def run(self, steps: int, forward: torch.nn.Module | None = None, batch_size: int | None = None) -> float:
        """Seconds for `steps` steps, augmentation included, the device synchronised at both ends;
        through `forward` (default: this setup's) at `batch_size` images a step (default: its own)."""
        batch_size = batch_size or self.batch_size
        order = torch.randperm(len(self.data), device=self.device)[: batch_size * steps]
        augment = AugmentConfig(flip=True, translate=4, cutout=0)
        batches = device_batches(
            self.data, order, batch_size, CIFAR10_MEAN, CIFAR10_STD, augment, self.generator
        )
        sync(self.device)
        started = time.perf_counter()
        train_one_epoch(
            forward or self.forward,
            self.optimizer,
            self.scheduler,
            batches,
            steps,
            self.device,
            0.1,
            self.amp,
            True,
        )
        sync(self.device)
        return time.perf_counter() - started


def profile(setup: Setup, steps: int) -> str:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if setup.device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        wall = setup.run(steps)
    events = prof.key_averages()
    # Kernels only: the aten ops above them carry the same device time again.
    kernel_us = sum(
        event.self_device_time_total
        for event in events
        if event.device_type == DeviceType.CUDA and not event.is_user_annotation
    )
    table = events.table(
        sort_by="self_device_time_total" if kernel_us else "self_cpu_time_total", row_limit=12
    )
    return (
        f"{steps} eager steps at batch {setup.batch_size}, profiled: wall {wall * 1e3 / steps:.2f} ms/step, "
        f"GPU kernel time {kernel_us / 1e3 / steps:.2f} ms/step "
        f"({kernel_us / 1e6 / wall:.0%} of the wall time; profiling adds host time)\n{table}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch-sizes", default="256,512,1024")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile-batch", type=int, default=512)
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"training autocast: {training_dtype(device, args.precision)}")
    modes = (False, True) if device.type == "cuda" else (False,)
    flops = training_flops_per_image(args.width)
    tflops = matmul_tflops(device, 8192 if device.type == "cuda" else 1024)
    ceiling = tflops * 1e12 / flops
    print(f"bf16 matmul {tflops:.1f} TFLOP/s; {flops / 1e9:.2f} GFLOP per training image")
    print(f"ceiling: {ceiling:,.0f} images/s")
    rows = []
    for batch_size in (int(size) for size in args.batch_sizes.split(",")):
        setups = {
            graphs: Setup(device, args.width, batch_size, args.steps, graphs, args.precision)
            for graphs in modes
        }
        for setup in setups.values():
            setup.run(min(5, args.steps))  # warm-up: cuDNN's benchmark search, allocator growth
        times: dict[bool, list[float]] = {graphs: [] for graphs in modes}
        for index in range(args.rounds):
            for graphs in modes if index % 2 == 0 else tuple(reversed(modes)):
                times[graphs].append(setups[graphs].run(args.steps))
        for graphs in modes:
            seconds = statistics.median(times[graphs])
            speed = batch_size * args.steps / seconds
            rows.append((batch_size, "graphs" if graphs else "eager", seconds * 1e3 / args.steps, speed))
        if batch_size == args.profile_batch:
            print(profile(setups[False], min(10, args.steps)))
        del setups
    print("\nbatch  mode    ms/step  images/s  fraction of ceiling  20 epochs of 50,000 (s)")
    for batch_size, mode, ms, speed in rows:
        fraction = speed / ceiling
        print(f"{batch_size:5d}  {mode:6s}  {ms:7.2f}  {speed:8,.0f}  {fraction:19.3f}  {1e6 / speed:10.1f}")


if __name__ == "__main__":
    main()
