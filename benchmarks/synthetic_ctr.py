"""What the synthetic CTR task allows, and how much of it a pre-trained encoder has learnt.

    python benchmarks/synthetic_ctr.py [--archs hsa bert4rec] [--ckpt-root models/pretrain]

Regenerates the synthetic log of params.yaml (`data.size`, `data.seed`) with its hidden
variables, reads the prepared CTR windows (`data/prepared`) and prints, per window:
    true-probability AUC   ranking by the generator's own click probability (the ceiling);
    true-interest AUC      ranking by interest[user, ad topic] (what a history can reveal);
    history-topic AUC      ranking by the share of the ad's topic in the user's window history,
                           topics known exactly (an oracle for the model's input);
and per pre-trained checkpoint:
    item topic purity      share of behavior items whose nearest item (cosine) has their topic;
    ad topic accuracy      share of ads whose nearest behavior item has the ad's topic;
    zero-shot AUC          test AUC of the paper's dot(user, candidate) with no CTR training.
This is how the under-trained encoders of the first synthetic runs were found (purity 0.43 after
3 epochs at lr 1e-3).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import polars as pl
import torch

from ptum import checkpoint
from ptum.config import load_params
from ptum.data.synthetic import generate, spec_for
from ptum.finetune.data import load_ctr
from ptum.finetune.metrics import roc_auc
from ptum.finetune.vectors import all_user_vectors, item_vectors


def topics(prepared: Path, latent: dict) -> tuple[np.ndarray, np.ndarray]:
    """(topic per item_id, -1 if unknown; is-ad flag per item_id) from the generator's titles."""
    title_topic = {t: int(latent["item_topic"][i]) for i, t in enumerate(latent["titles"])}
    ad_topic = {t: int(latent["ad_topic"][i]) for i, t in enumerate(latent["ad_titles"])}
    items = pl.read_parquet(prepared / "items.parquet")
    topic = np.full(int(items["item_id"].max()) + 1, -1)
    is_ad = np.zeros(len(topic), dtype=bool)
    for iid, text in zip(items["item_id"], items["text"]):
        topic[iid] = title_topic.get(text, ad_topic.get(text, -1))
        is_ad[iid] = text in ad_topic and text not in title_topic
    return topic, is_ad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    ap.add_argument("--tokenized", type=Path, default=Path("data/tokenized"))
    ap.add_argument("--ckpt-root", type=Path, default=Path("models/pretrain"))
    ap.add_argument("--archs", nargs="*", default=["hsa"])
    args = ap.parse_args()
    p = load_params(args.params)
    if p.data.source != "synthetic":
        raise SystemExit("synthetic_ctr.py: data.source is not synthetic")
    spec = spec_for(p.data.size)
    latent: dict = {}
    generate(spec, p.data.seed, latent=latent)
    topic, is_ad = topics(args.prepared, latent)
    task = load_ctr(args.prepared, args.tokenized, p.prepare.max_behaviors, [1.0])
    d = task.data
    # Ceilings per window: the impression's user and ad are recovered from the prepared rows.
    imps = pl.read_parquet(args.prepared / "impressions.parquet")
    user = np.array([int(u[1:]) for u in imps["user_id"]])
    interest = latent["interest"][user, np.maximum(topic[d.item], 0)]
    base = -2.5 + 12.0 * interest  # the generator's logit without the ad quality term
    print(f"synthetic {p.data.size} (seed {p.data.seed}): {spec.n_topics} topics")
    print(f"{'window':>7} {'n':>6} {'true-interest AUC':>18} {'history-topic AUC':>18}")
    for w in ("train", "valid", "test"):
        idx = np.flatnonzero(d.window == w)
        hist = d.hist_test if w == "test" else d.hist_train
        share = np.empty(len(idx))
        for j, i in enumerate(idx):
            h = topic[hist.items[d.row[i], : hist.lengths[d.row[i]]]]
            share[j] = ((h == topic[d.item[i]]).sum() + 0.5) / (len(h) + 0.5 * spec.n_topics)
        print(
            f"{w:>7} {len(idx):>6} {roc_auc(d.clicked[idx], base[idx]):>18.3f} "
            f"{roc_auc(d.clicked[idx], share):>18.3f}"
        )
    click = latent["click_prob"]
    print(
        f"true-probability AUC over all generated impressions: "
        f"{roc_auc((np.random.default_rng(0).random(len(click)) < click).astype(int), click):.3f}"
    )

    test = np.flatnonzero(d.window == "test")
    behaviors = np.flatnonzero(~is_ad & (topic >= 0))
    ads = np.flatnonzero(is_ad)
    for arch in args.archs:
        model = checkpoint.load(args.ckpt_root / arch).model.eval()
        with torch.no_grad():
            users = all_user_vectors(model, d.hist_test, torch.device("cpu"))
            vecs = item_vectors(model, d.hist_train.tokens, np.arange(d.hist_train.tokens.shape[0]))
            unit = torch.nn.functional.normalize(vecs, dim=-1)
            sim = unit[behaviors] @ unit[behaviors].T
            sim.fill_diagonal_(-2.0)
            purity = (topic[behaviors][sim.argmax(1).numpy()] == topic[behaviors]).mean()
            nearest = (unit[ads] @ unit[behaviors].T).argmax(1).numpy()
            ad_acc = (topic[behaviors][nearest] == topic[ads]).mean()
            zero = (users[d.row[test]] * vecs[d.item[test]]).sum(-1).numpy()
        print(
            f"{arch}: item topic purity {purity:.3f}, ad topic accuracy {ad_acc:.3f}, "
            f"zero-shot test AUC {roc_auc(d.clicked[test], zero):.3f}"
        )


if __name__ == "__main__":
    main()
