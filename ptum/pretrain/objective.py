"""The pre-training objective (MBP + lambda * NBP) as a module a step calls (DDP-wrappable), and
its evaluation on held-out users with fixed samples."""

from __future__ import annotations

import numpy as np
import torch

from ptum.data.corpus import Corpus
from ptum.models.user_model import UserModel
from ptum.pretrain.data import Batch, make_batch, step_rng
from ptum.pretrain.options import TrainOptions
from ptum.pretrain.tasks import ptum_step


class Objective(torch.nn.Module):
    """The pre-training objective as a module, so DistributedDataParallel can wrap it (DDP
    all-reduces gradients of what runs inside its `forward`)."""

    def __init__(self, model: UserModel, opts: TrainOptions):
        super().__init__()
        self.model = model
        self.opts = opts

    def forward(self, tokens: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        o = self.opts
        return ptum_step(self.model, tokens, batch, use_mbp=o.mbp, use_nbp=o.nbp, lam=o.lam)


def objective_module(model: UserModel, opts: TrainOptions, world: int) -> torch.nn.Module:
    """The objective module a step calls: wrapped in DDP when several processes train."""
    objective: torch.nn.Module = Objective(model, opts)
    if world > 1:
        # A switched-off task leaves parameters (e.g. mask_vector) without gradients.
        objective = torch.nn.parallel.DistributedDataParallel(
            objective, find_unused_parameters=not (opts.mbp and opts.nbp)
        )
    return objective


@torch.no_grad()
def evaluate(
    model: UserModel,
    tokens: torch.Tensor,
    corpus: Corpus,
    opts: TrainOptions,
    device: torch.device,
    batch_size: int = 256,
) -> dict[str, float]:
    """MBP/NBP loss and accuracy on a held-out corpus with fixed samples (seeded by opts.seed)."""
    model.eval()
    rows = np.flatnonzero(corpus.lengths >= 2)
    sums: dict[str, float] = {}
    n = 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batch = make_batch(
            corpus,
            chunk,
            step_rng(opts.seed, 2**20, start),
            k=opts.k,
            p=opts.p,
            negatives=opts.negatives,
        ).to(device)
        with autocast(device):
            out = ptum_step(model, tokens, batch, use_mbp=True, use_nbp=True, lam=opts.lam)
        for key, v in out.items():
            sums[key] = sums.get(key, 0.0) + float(v) * len(chunk)
        n += len(chunk)
    model.train()
    return {f"valid_{k}": v / max(n, 1) for k, v in sums.items()}


def autocast(device: torch.device):
    """bf16 autocast on CUDA; a no-op context on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)
