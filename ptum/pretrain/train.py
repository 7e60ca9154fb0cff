"""The pre-training loop: explicit, resumable, optionally data-parallel (ranks + DDP).

Determinism: the user order of an epoch, the samples of a step and the dropout noise of a step
are pure functions of (seed, epoch, step), so a run resumed from any saved step ends with the
same weights as an uninterrupted one, and N data-parallel processes see the same global batch
as one process does (each takes rows rank::N of it). With `deterministic` on, torch's
deterministic kernels and a fixed thread count make two runs bit-identical (checkpoint bytes
included): the checkpoint holds no timing, only what the inputs determine.

Progress: tqdm bars (epochs, batches of the epoch, with ETA) on stderr when it is a terminal,
else a line at most once a minute (`ptum.progress`); one JSON summary line per epoch either way.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from ptum import checkpoint
from ptum.data.corpus import Corpus, bucketed_order
from ptum.models.behavior import HybridBehaviorEncoder
from ptum.models.id_vocab import IdVocab
from ptum.models.user_model import ModelConfig, UserModel
from ptum.pretrain.data import make_batch, step_rng
from ptum.pretrain.objective import autocast, evaluate, objective_module
from ptum.pretrain.options import TrainOptions, check_negatives, deterministic_mode, pick_device
from ptum.pretrain.resume import Position, load_position
from ptum.pretrain.stopping import Interrupted, StopFlag, stop_agreed, stop_signals
from ptum.progress import LogLines, progress

# Per-epoch figures that depend on the machine, not on the inputs: logged and reported, never
# stored in the checkpoint (its bytes must be a function of its inputs).
TIMING_KEYS = ("users_per_s", "epoch_seconds")


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def pretrain(
    *,
    train: Corpus,
    valid: Corpus,
    config: ModelConfig,
    opts: TrainOptions,
    out_dir: Path,
    meta: dict[str, Any],
    device: torch.device | None = None,
    resume: bool = True,
    log: Callable[[str], None] | None = None,
    on_epoch: Callable[[int, UserModel, dict], None] | None = None,
    id_vocab: IdVocab | None = None,
    threads: int = 1,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Pre-train a user model; checkpoints every epoch in out_dir (and on SIGTERM/SIGINT).

    Returns the final metrics. `meta` (tokenizer/data hashes, params) is stored in checkpoints.
    `id_vocab` is required by (and only used with) the hybrid behavior encoder; a checkpoint
    built on another vocabulary is refused rather than resumed.
    `on_epoch(epoch, model, metrics)` runs after each epoch's checkpoint (rank 0 sees the same
    model as every rank); an exception it raises (e.g. optuna.TrialPruned) ends training.
    Its metrics (and the log line, and the return value) add the epoch's TIMING_KEYS to what the
    checkpoint's history records. `log` defaults to stdout through tqdm (clears the bars).
    `threads`: torch threads under `opts.deterministic`. `progress`: tqdm bars on stderr (None:
    when it is a terminal; False for callers with a bar of their own, e.g. tuning trials;
    True: always).
    """
    with deterministic_mode(opts.deterministic, threads):
        return _pretrain(
            train=train,
            valid=valid,
            config=config,
            opts=opts,
            out_dir=out_dir,
            meta=meta,
            device=device or pick_device(),
            resume=resume,
            log=log or _write,
            on_epoch=on_epoch,
            id_vocab=id_vocab,
            progress=progress,
        )


def _write(msg: str) -> None:
    tqdm.write(msg, file=sys.stdout)


def _pretrain(
    *,
    train: Corpus,
    valid: Corpus,
    config: ModelConfig,
    opts: TrainOptions,
    out_dir: Path,
    meta: dict[str, Any],
    device: torch.device,
    resume: bool,
    log: Callable[[str], None],
    on_epoch: Callable[[int, UserModel, dict], None] | None,
    id_vocab: IdVocab | None,
    progress: bool | None,
) -> dict[str, Any]:
    """Set up (model, optimiser, resume, DDP), then run `_train_loop` under signal handling."""
    rank, world = _dist_info()
    _check_inputs(train, valid, opts, world)
    model, id_vocab = _build_model(config, opts, device, id_vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    eligible = np.flatnonzero(train.lengths >= 2)
    steps_per_epoch = math.ceil(len(eligible) / opts.batch_size)
    if steps_per_epoch == 0:
        raise ValueError("no pre-training user has 2 or more behaviors")
    pos = Position()
    if resume and checkpoint.exists(out_dir):
        pos = load_position(out_dir, model, opt, meta, config, opts, id_vocab, steps_per_epoch, log)
    run = _Run(
        model=model,
        opt=opt,
        objective=objective_module(model, opts, world),
        tokens=train.tokens.to(device),
        train=train,
        valid=valid,
        eligible=eligible,
        steps_per_epoch=steps_per_epoch,
        opts=opts,
        device=device,
        rank=rank,
        world=world,
        out_dir=out_dir,
        save_meta={**meta, "model_config": config.to_dict(), "train_options": asdict(opts)},
        id_vocab=id_vocab,
    )
    # disable=None: tqdm turns itself off when stderr is not a terminal (CI logs stay short).
    disable = True if rank != 0 or progress is False else (None if progress is None else False)
    with (
        stop_signals() as stop,
        _progress_bars(opts.epochs, pos.epoch, steps_per_epoch, disable) as bars,
    ):
        last = _train_loop(run, pos, stop, bars, log, on_epoch)
    # The last epoch run here carries its timing; a run that only loaded a finished checkpoint
    # reports the checkpoint's last epoch without one.
    if pos.history and last.get("epoch") == pos.history[-1]["epoch"]:
        return last
    return dict(pos.history[-1]) if pos.history else {}


def _check_inputs(train: Corpus, valid: Corpus, opts: TrainOptions, world: int) -> None:
    """Refuse a batch that does not split over the processes, or a `p` a corpus cannot serve."""
    if opts.batch_size % world:
        raise ValueError(f"pretrain.batch_size {opts.batch_size} must divide by {world} processes")
    check_negatives(train, opts)
    check_negatives(valid, opts, "held-out")


def _build_model(
    config: ModelConfig, opts: TrainOptions, device: torch.device, id_vocab: IdVocab | None
) -> tuple[UserModel, IdVocab | None]:
    """A freshly initialised model (seeded by opts.seed) on `device`, and the id vocabulary it
    uses: `id_vocab` for the hybrid behavior encoder (checked against the config), else None."""
    torch.manual_seed(opts.seed)
    model = UserModel(config=config)
    if isinstance(model.behavior_encoder, HybridBehaviorEncoder):  # model.uses_item_ids
        if id_vocab is None or id_vocab.size != config.id_vocab:
            raise ValueError(
                "the hybrid behavior encoder needs the id_vocab its config was sized by"
            )
        model.behavior_encoder.set_id_index(id_vocab.id_index())
    else:
        id_vocab = None
    return model.to(device), id_vocab


@dataclass(frozen=True)
class _Run:
    """What the loop of one pre-training run reads; fixed once set up (a record, not a trainer:
    the loop itself is `_train_loop`)."""

    model: UserModel
    opt: torch.optim.Optimizer
    objective: torch.nn.Module  # the model's loss, DDP-wrapped when world > 1
    tokens: torch.Tensor  # (num_items, max_tokens) on device
    train: Corpus
    valid: Corpus
    eligible: np.ndarray  # training rows with 2 or more behaviors
    steps_per_epoch: int
    opts: TrainOptions
    device: torch.device
    rank: int
    world: int
    out_dir: Path
    save_meta: dict[str, Any]  # what every checkpoint of the run stores besides its position
    id_vocab: IdVocab | None


@contextmanager
def _progress_bars(
    epochs: int, initial: int, steps_per_epoch: int, disable: bool | None
) -> Iterator[tuple[tqdm | LogLines, tqdm | LogLines]]:
    """The (epochs, batches of the epoch) bars, closed after the block: tqdm on a terminal,
    log lines at most once a minute otherwise (`ptum.progress`); `disable` True: none,
    False: tqdm bars even off a terminal."""
    epoch_bar: tqdm | LogLines
    batch_bar: tqdm | LogLines
    if disable is None:
        epoch_bar = progress(total=epochs, initial=initial, unit="epoch", desc="pretrain")
        batch_bar = progress(total=steps_per_epoch, unit="batch", desc="batches", leave=False)
    else:
        epoch_bar = tqdm(
            total=epochs, initial=initial, unit="epoch", desc="pretrain", disable=disable
        )
        batch_bar = tqdm(total=steps_per_epoch, unit="batch", leave=False, disable=disable)
    try:
        yield epoch_bar, batch_bar
    finally:
        batch_bar.close()
        epoch_bar.close()


def _save(run: _Run, pos: Position, epoch: int, step: int) -> None:
    """Checkpoint the run at (epoch, step) (rank 0 writes; every rank waits for it)."""
    if run.rank == 0:
        checkpoint.save(
            run.out_dir,
            run.model,
            {
                **run.save_meta,
                "epoch": epoch,
                "step_in_epoch": step,
                "global_step": epoch * run.steps_per_epoch + step,
                "history": pos.history,
                "partial_epoch": pos.partial,
                "complete": epoch >= run.opts.epochs,
            },
            run.opt,
            id_vocab=run.id_vocab,
        )
    if run.world > 1:
        dist.barrier()


def _train_loop(
    run: _Run,
    pos: Position,
    stop: StopFlag,
    bars: tuple[tqdm | LogLines, tqdm | LogLines],
    log: Callable[[str], None],
    on_epoch: Callable[[int, UserModel, dict], None] | None,
) -> dict[str, Any]:
    """Train from `pos` to the last epoch (or opts.max_steps), checkpointing after each epoch
    and on a stop signal; returns the metrics of the last epoch run here ({} if none ran)."""
    opts, (epoch_bar, batch_bar) = run.opts, bars
    run.model.train()
    last: dict[str, Any] = {}
    while pos.epoch < opts.epochs:
        t0 = time.perf_counter()
        ran = _train_epoch(run, pos, stop, batch_bar)
        if ran is None:
            break  # max_steps reached
        # The epoch ran to its end: evaluate, log, checkpoint.
        seconds = time.perf_counter() - t0
        sums, seen = pos.partial["sums"], pos.partial["seen"]
        metrics = {
            "epoch": pos.epoch + 1,
            **{f"train_{k}": v / max(seen, 1) for k, v in sums.items()},
        }
        metrics.update(evaluate(run.model, run.tokens, run.valid, opts, run.device))
        pos.history.append(metrics)
        timing = {
            "users_per_s": ran * opts.batch_size / max(seconds, 1e-9),
            "epoch_seconds": seconds,
        }
        log(_log_line(metrics | timing))
        pos.epoch, pos.step_in_epoch = pos.epoch + 1, 0
        pos.partial = {"seen": 0, "sums": {}}
        _save(run, pos, pos.epoch, 0)
        epoch_bar.update()
        if on_epoch is not None:
            on_epoch(pos.epoch, run.model, metrics | timing)
        if stop_agreed(stop, run.world, run.device) and pos.epoch < opts.epochs:
            raise Interrupted(stop.signum or signal.SIGTERM)
        last = metrics | timing
    if opts.max_steps and pos.epoch < opts.epochs:
        _save(run, pos, pos.epoch, opts.max_steps - pos.epoch * run.steps_per_epoch)
    if run.rank == 0:
        # The live checkpoint was just saved or loaded (verified): remove what a kill during
        # a save's clean-up may have left beside it, so the output equals an uninterrupted
        # run's.
        checkpoint.tidy(run.out_dir)
    return last


def _log_line(values: dict[str, Any]) -> str:
    """An epoch's figures as one JSON line, floats rounded to 4 places."""
    return json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in values.items()})


def _train_epoch(
    run: _Run, pos: Position, stop: StopFlag, batch_bar: tqdm | LogLines
) -> int | None:
    """Run the steps of epoch pos.epoch from pos.step_in_epoch, keeping the running loss sums in
    pos.partial; returns how many steps ran, or None when opts.max_steps stopped the epoch.

    A stop signal checkpoints the next step and raises Interrupted (one during the epoch's last
    step lets the epoch finish, so that it is evaluated and saved as a whole)."""
    opts, epoch = run.opts, pos.epoch
    rng = np.random.default_rng([opts.seed, epoch, 2**31 - 1])
    order = run.eligible[bucketed_order(run.train.lengths[run.eligible], opts.batch_size, rng)]
    sums, seen, ran = dict(pos.partial["sums"]), pos.partial["seen"], 0
    batch_bar.reset(total=run.steps_per_epoch)
    batch_bar.update(pos.step_in_epoch)
    batch_bar.set_description(f"epoch {epoch + 1}")
    for step in range(pos.step_in_epoch, run.steps_per_epoch):
        global_step = epoch * run.steps_per_epoch + step
        if opts.max_steps and global_step >= opts.max_steps:
            return None
        rows = order[step * opts.batch_size : (step + 1) * opts.batch_size]
        batch = make_batch(
            run.train,
            rows,
            step_rng(opts.seed, epoch, step),
            k=opts.k,
            p=opts.p,
            negatives=opts.negatives,
        )
        batch = batch.shard(run.rank, run.world).to(run.device)
        # Dropout noise: a function of (seed, step, rank), so a resumed run draws the same.
        torch.manual_seed(opts.seed * 1_000_003 + global_step * 101 + run.rank)
        with autocast(run.device):
            out = run.objective(run.tokens, batch)
        run.opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        if opts.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(run.model.parameters(), opts.grad_clip)
        run.opt.step()
        for key, v in out.items():
            sums[key] = sums.get(key, 0.0) + float(v.detach())
        seen, ran = seen + 1, ran + 1
        pos.partial = {"seen": seen, "sums": sums}
        batch_bar.update()
        if batch_bar.n % 10 == 0:
            batch_bar.set_postfix(loss=f"{sums['loss'] / seen:.3f}", refresh=False)
        if stop_agreed(stop, run.world, run.device) and step + 1 < run.steps_per_epoch:
            _save(run, pos, epoch, step + 1)
            raise Interrupted(stop.signum or signal.SIGTERM)
    return ran
