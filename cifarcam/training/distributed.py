"""Training in several processes under torchrun: the process group, each rank's share of the data,
and the collectives that keep the ranks in step (sums, agreement on errors and stops). A single
process is the group of one (`SINGLE`), where every collective is the identity."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from cifarcam.errors import EXIT_RUNTIME, CifarcamError, PeerFailed, UsageError, interrupt_exit_code

T = TypeVar("T")
_NO_BAD_STEP = 2**62  # stands for "every loss finite" when ranks take the minimum of their first bad step


@dataclass
class Group:
    """This process's place among the ranks of one training run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    # Set when every rank has reached the same ending (success or an agreed error), so they may
    # wait for each other before exiting; after a one-sided failure nobody waits.
    agreed_exit: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rows(self, count: int) -> slice:
        """This rank's contiguous share of `count` items, without repeats; sizes differ by at most
        one and the lower ranks get the larger shares (so rank 0's share is empty only if count is 0)."""
        size, extra = divmod(count, self.world_size)
        start = self.rank * size + min(self.rank, extra)
        return slice(start, start + size + (self.rank < extra))

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            tensor = tensor.clone()
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def first_bad_step(self, step: torch.Tensor) -> torch.Tensor:
        """The earliest non-negative `step` over the ranks (-1 where every rank has -1)."""
        if not self.distributed:
            return step
        encoded = torch.where(step < 0, torch.full_like(step, _NO_BAD_STEP), step)
        dist.all_reduce(encoded, op=dist.ReduceOp.MIN)
        return torch.where(encoded == _NO_BAD_STEP, torch.full_like(step, -1), encoded)

    def max_int(self, value: int) -> int:
        """The largest `value` over the ranks (a CPU tensor: gloo, no GPU sync)."""
        if not self.distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return int(tensor.item())

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any."""
        return self.max_int(int(flag)) > 0

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Give every rank rank 0's buffers (BatchNorm running statistics)."""
        if self.distributed:
            for buffer in module.buffers():
                dist.broadcast(buffer, src=0)

    def agree(self, action: Callable[[], T]) -> T:
        """Run `action` on every rank, then let all ranks learn whether any of them failed: the lowest
        failing rank raises its own error (which the CLI prints), the others PeerFailed with its exit
        code (not printed), so an error is printed once and no rank waits for the others."""
        if not self.distributed:
            return action()
        failure: BaseException | None = None
        try:
            result = action()
        except BaseException as error:  # re-raised below, once the ranks agree
            failure = error
        outcomes: list[Any] = [None] * self.world_size
        dist.all_gather_object(outcomes, None if failure is None else _exit_code(failure))
        failed = [rank for rank, code in enumerate(outcomes) if code is not None]
        if not failed:
            return result
        self.agreed_exit = True
        if failed[0] == self.rank and failure is not None:
            raise failure
        raise PeerFailed(failed[0], outcomes[failed[0]])

    def from_main(self, action: Callable[[], T]) -> T:
        """Run `action` on rank 0 only (it may touch the run directory) and give its result to all."""
        if not self.distributed:
            return action()
        shared: list[Any] = [self.agree(lambda: action() if self.is_main else None)]
        dist.broadcast_object_list(shared, src=0)
        return shared[0]

    def raise_together(self, error: CifarcamError) -> PeerFailed | CifarcamError:
        """The error to raise on this rank when all ranks stop on the same `error`: rank 0 tells."""
        self.agreed_exit = True
        return error if self.is_main else PeerFailed(0, error.exit_code)


SINGLE = Group()


def _exit_code(error: BaseException) -> int:
    if isinstance(error, CifarcamError):
        return error.exit_code
    return interrupt_exit_code(error) if isinstance(error, KeyboardInterrupt) else EXIT_RUNTIME


@contextlib.contextmanager
def process_group() -> Iterator[Group]:
    """The group of this process: torchrun's ranks (a process group for the block), else SINGLE;
    gloo for CPU tensors, NCCL for CUDA ones, each rank on the GPU numbered by its LOCAL_RANK."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield Group()
        return
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    try:
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=timedelta(minutes=30))
    except (ValueError, RuntimeError) as error:  # torch's rendezvous: an address or port it cannot use
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"cannot join the torchrun process group ({first})") from None
    group = Group(dist.get_rank(), dist.get_world_size(), local_rank)
    finished = False
    try:
        yield group
        finished = True
    finally:
        if finished or group.agreed_exit:
            # Nobody exits before everyone has printed: torchrun stops the others when one exits.
            with contextlib.suppress(Exception):
                dist.barrier()
            # Each rank now exits with its own code; torchrun would SIGTERM the slower ones.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        dist.destroy_process_group()


def launch(processes: int, argv: list[str]) -> int:
    """Run `python -m cifarcam ARGV` in `processes` processes on this machine through PyTorch's
    elastic launcher, as `torchrun --standalone --nproc-per-node N` does (one thread each unless
    OMP_NUM_THREADS says otherwise); returns 0, or the exit code of the first rank that failed
    (which printed why), or 128 + the signal that stopped the launcher."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the processes share this machine's cores
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=processes,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
    )
    try:
        elastic_launch(config, sys.executable)("-m", "cifarcam", *argv)
    except ChildFailedError as error:
        return error.get_first_failure()[1].exitcode
    except SignalException as error:  # the ranks were sent SIGTERM: they save and stop
        return 128 + int(error.sigval)
    return 0
