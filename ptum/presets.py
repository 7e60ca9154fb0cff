"""Named sets of parameter overrides (as `section.key=value` strings).

`QUICK` shrinks every stage so the whole pipeline runs in a few minutes on 2 CPU cores: the tiny
synthetic log, tiny encoders, one epoch, two seeds, one model per task, no worker processes,
one class weighting, 100 bootstrap replicates, a two-trial tuning study. Used by tests,
`make quick` and the Prefect flow's `quick` parameter (as `dvc exp run -S ...` /
`ptum STAGE --set ...`).
"""

QUICK: tuple[str, ...] = (
    "data.size=tiny",
    "prepare.max_behaviors=20",
    "prepare.ctr_train_frac=0.3",
    "prepare.ctr_test_frac=0.2",
    "tokenize.vocab_size=400",
    "pretrain.epochs=1",
    "pretrain.architectures=[hsa, nativectr]",
    "finetune.demo_models=[hsa]",
    "finetune.ctr_models=[nativectr]",
    "finetune.workers=1",
    "sensitivity.tasks=[demo]",
    "pretrain.model.word_dim=16",
    "pretrain.model.dim=16",
    "pretrain.model.heads=2",
    "pretrain.model.head_dim=8",
    "pretrain.model.attn_hidden=16",
    "pretrain.model.layers=1",
    "finetune.repeats=2",
    "finetune.max_epochs=2",
    "finetune.head_hidden=16",
    "sensitivity.lams=[0.0, 1.0]",
    "sensitivity.ks=[2]",
    "sensitivity.repeats=2",
    "finetune.bootstrap=100",
    "finetune.class_weights=[none]",
    "tune.n_trials=2",
    "tune.epochs=1",
    "tune.finetune_epochs=1",
    "tune.prune_startup_trials=1",
)


if __name__ == "__main__":
    import shlex

    # `dvc exp run $(python -m ptum.presets)`: the QUICK overrides as -S arguments.
    print(shlex.join(a for o in QUICK for a in ("-S", o)))
