"""Stopping pre-training on a signal: SIGTERM/SIGINT set a flag that the loop reads at step
boundaries; it then saves a checkpoint and raises `Interrupted` (the CLI exits 128 + signal).
With several ranks, every rank stops at the same step (`stop_agreed`)."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop saves a checkpoint at the next step boundary and exits."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum: int, _frame: Any) -> None:
        self.signum = signum


class Interrupted(RuntimeError):
    def __init__(self, signum: int):
        super().__init__(f"interrupted by signal {signum}; checkpoint saved")
        self.signum = signum


@contextmanager
def stop_signals() -> Iterator[StopFlag]:
    """A flag SIGTERM/SIGINT set inside the block (the previous handlers are restored after)."""
    stop = StopFlag()
    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def stop_agreed(stop: StopFlag, world: int, device: torch.device) -> bool:
    """Whether any rank got a stop signal, the same answer on every rank: a signal may reach
    one machine's ranks only (its agent was told to stop), and a save is collective, so every
    rank must stop at the same step (one small all-reduce per step)."""
    if world == 1:
        return stop.signum is not None
    flag = torch.tensor([stop.signum or 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    # The answer is the reduced flag alone: a signal handled after the all-reduce (Python runs
    # handlers when the blocking call returns) counts at the next step, on every rank alike.
    agreed = int(flag.item())
    if agreed:
        stop.signum = agreed
    return bool(agreed)
