"""What a CUDA training run's first steps cost beyond the steady step, measured on one GPU.

One fresh process per cuDNN setting (benchmark mode on, as `cifarcam train` sets it by default,
and off), since cuDNN keeps what it timed for the rest of a process. Autocast is what `cifarcam
train --precision P` uses (auto: fp16 on CUDA). Each process times, with the device synchronised
around every step (on-device augmentation, channels_last):
- the first eager training step at the full batch (cuDNN's kernel timing when on, and the
  loading of every kernel it uses) and a second one;
- the first call of the CUDA-graph wrapper (its warm-up passes, the capture, one replay) and a
  second replay;
- the first step at a short batch of a shape not seen before with benchmark mode allowed, and
  one at another new shape with it off (cifarcam.devices.cudnn_autotune; what `train` does for
  a short last batch), with each shape's second step;
- the steady graphed step (median over rounds).

Usage: python benchmarks/gpu_warmup.py [--width 64] [--batch-size 512] [--short 336]
CPU dry run of the flow (no graphs): python benchmarks/gpu_warmup.py --device cpu --width 4
    --batch-size 16 --short 12 --steps 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
from gpu_step import Setup, sync

from cifarcam.devices import cudnn_autotune
from cifarcam.training.cuda_graphs import GraphedTraining

MODES = {"on": True, "off": False}


def timed_step(setup: Setup, model: torch.nn.Module, rows: int, autotune: bool = True) -> float:
    """Milliseconds for one training step on `rows` images, the device synchronised at both ends."""
    with cudnn_autotune(autotune):
        return setup.run(1, model, rows) * 1e3


def measure(args: argparse.Namespace) -> dict[str, float]:
    device = torch.device(args.device)
    started = time.perf_counter()
    torch.zeros(1, device=device)
    sync(device)
    result = {"device_init_ms": (time.perf_counter() - started) * 1e3}
    torch.backends.cudnn.benchmark = MODES[args.mode]
    setup = Setup(device, args.width, args.batch_size, args.steps, graphs=False, precision=args.precision)
    full, short = args.batch_size, args.short
    result["eager_first_ms"] = timed_step(setup, setup.model, full)
    result["eager_second_ms"] = timed_step(setup, setup.model, full)
    graphed = GraphedTraining(setup.model, full, setup.amp)
    result["graphs_first_ms"] = timed_step(setup, graphed, full)
    result["graphs_second_ms"] = timed_step(setup, graphed, full)
    result["short_timed_first_ms"] = timed_step(setup, graphed, short, autotune=True)
    result["short_timed_second_ms"] = timed_step(setup, graphed, short, autotune=True)
    result["short_untimed_first_ms"] = timed_step(setup, graphed, short - 2, autotune=False)
    result["short_untimed_second_ms"] = timed_step(setup, graphed, short - 2, autotune=False)
    steady = graphed if device.type == "cuda" else setup.model
    rounds = [setup.run(args.steps, steady) for _ in range(args.rounds)]
    result["steady_ms"] = statistics.median(rounds) * 1e3 / args.steps
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--short", type=int, default=336, help="a short last batch (50,000 mod 512)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    parser.add_argument("--mode", choices=sorted(MODES), help="measure one setting in this process")
    args = parser.parse_args()
    if args.mode is not None:
        print(json.dumps(measure(args)))
        return
    if args.device == "cuda":
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    results = {}
    for mode in MODES:
        command = [sys.executable, __file__, *sys.argv[1:], "--mode", mode]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"ms, batch {args.batch_size} (short batch {args.short}), cuDNN benchmark mode:")
    print(f"{'':24s}" + "".join(f"{mode:>10s}" for mode in results))
    for key in results["on"]:
        print(f"{key:24s}" + "".join(f"{row[key]:10.1f}" for row in results.values()))


if __name__ == "__main__":
    main()
