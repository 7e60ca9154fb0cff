"""Start one command in N local processes that form a data-parallel group (single machine)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence


def torchrun_command(args: Sequence[str], nproc: int) -> list[str]:
    """`python -m torch.distributed.run ... ARGS` for `nproc` local ranks."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        *args,
    ]


def run_local(args: Sequence[str], nproc: int) -> None:
    """Run `python ARGS` in `nproc` ranks; CalledProcessError if one fails."""
    subprocess.run(torchrun_command(args, nproc), check=True)
