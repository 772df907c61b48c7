"""Where this process runs: torchrun's ranks (DDP) and the signals that stop a run cleanly."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)  # what Slurm sends before a time limit / on preemption


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job (world 1 without torchrun)."""

    rank: int
    world: int
    device: torch.device
    owns_group: bool  # this module initialised the process group (and destroys it)

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Distributed:
    """Join the torchrun job if WORLD_SIZE > 1 (NCCL on CUDA, else gloo); pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world == 1:
        return Distributed(0, 1, device, False)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return Distributed(dist.get_rank(), dist.get_world_size(), device, owns)


def gather(obj: Any, d: Distributed) -> list[Any]:
    """Every rank's `obj`, in rank order (a list of one without DDP)."""
    if d.world == 1:
        return [obj]
    out: list[Any] = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


class StopSignals:
    """Remembers the first of `signals` to arrive; the training loop polls it between steps.

    The handler only sets a number: everything else (all-reduce, checkpoint, printing) happens in the
    loop, outside the handler. Repeats are ignored on purpose: under Slurm every process of the step gets
    SIGTERM and torchrun forwards its own copy to each rank right after.
    """

    def __init__(self, signals: tuple[signal.Signals, ...]):
        self.signals = signals
        self.received = 0  # signal number, 0: none
        self._previous = {s: signal.signal(s, self._handle) for s in signals}  # main thread only

    def _handle(self, signum: int, frame: object) -> None:
        self.received = self.received or signum

    @contextlib.contextmanager
    def blocked(self) -> Iterator[None]:
        """Block the signals in this thread meanwhile: processes and threads started inside inherit the
        mask and never get them. For DataLoader workers: Slurm signals every process of a step, and
        torch's worker handler would let SIGTERM kill them, which fails the main process mid-step.
        (They still exit with the main process.) Signals that arrive meanwhile are handled afterwards."""
        if not self.signals:
            yield
            return
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, self.signals)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
