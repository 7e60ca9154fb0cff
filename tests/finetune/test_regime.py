"""The paper-regime experiment: nested pre-training pools around the labeled set, one grid per
pool, gains and edges paired by repeat; on a tiny synthetic set whose labeled share is small."""

from __future__ import annotations

import json
import zlib
from dataclasses import replace

import numpy as np
import pytest

from ptum import checkpoint
from ptum.config import (
    ConfigError,
    FinetuneConfig,
    ModelParams,
    Params,
    PrepareConfig,
    PretrainConfig,
    RegimeConfig,
)
from ptum.data import synthetic
from ptum.data.ingest import ingest
from ptum.data.pool import labeled_users, pool_order, pool_users, users_digest
from ptum.data.prepare import prepare
from ptum.finetune import regime as reg
from ptum.finetune.baselines import DEMO_BASELINES
from ptum.finetune.cache import CellKeys
from ptum.finetune.cells import Cell
from ptum.finetune.summary import comparisons, predictions_frame
from ptum.stages.finetune import grid_options
from ptum.stages.prepare import prepare_options
from ptum.stages.pretrain import pretrain_one
from ptum.tokenize import tokenize
from tests.finetune.conftest import SPLIT

SIZES = ModelParams(word_dim=8, dim=8, heads=2, head_dim=4, attn_hidden=8, layers=1)


@pytest.fixture(scope="module")
def few_labeled(tmp_path_factory):
    """A tiny synthetic set where about a fifth of the users are labeled (a Demo label or CTR
    impressions), so that pools of 1x and 2x the labeled users fit."""
    root = tmp_path_factory.mktemp("regime")
    spec = replace(synthetic.PRESETS["tiny"], n_users=400, labeled_frac=0.12, audience_frac=0.1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(synthetic.PRESETS, "few_labeled", spec)  # the dict spec_for reads
        ingest(source="synthetic", path="", out_dir=root / "raw", size="few_labeled", seed=7)
    prepare(
        root / "raw",
        root / "prepared",
        prepare_options(PrepareConfig(max_behaviors=20, ctr_train_frac=0.3, ctr_test_frac=0.2)),
    )
    tokenize(
        root / "prepared" / "items.parquet",
        root / "tokenized",
        vocab_size=300,
        model_type="unigram",
        byte_fallback=True,
        max_tokens=16,
        character_coverage=1.0,
        seed=1,
    )
    return root


def test_pools_hold_the_labeled_users_first_and_grow_by_adding_unlabeled_ones(few_labeled):
    prepared = few_labeled / "prepared"
    order, n = pool_order(prepared)
    labeled = labeled_users(prepared)
    assert 0 < n < len(order) / 3  # the labeled share is small here
    assert set(order[:n]) <= labeled and not set(order[n:]) & labeled
    assert len(set(order)) == len(order)
    assert pool_order(prepared) == (order, n)  # one fixed order
    one, two = pool_users(prepared, n), pool_users(prepared, 2 * n)
    assert set(one) == set(order[:n]) and set(one) < set(two) and len(two) == 2 * n
    assert one == sorted(one)  # in the corpus's order
    with pytest.raises(ValueError, match=f"corpus in .* has {len(order)} training users"):
        pool_users(prepared, len(order) + 1)


def test_a_labeled_subset_makes_the_other_labeled_users_unlabeled(few_labeled):
    prepared = few_labeled / "prepared"
    everyone = labeled_users(prepared)
    kept = labeled_users(prepared, 10)
    assert len(kept) == 10 and kept < everyone and labeled_users(prepared, 10) == kept
    order, n = pool_order(prepared, 10)
    assert set(order[:n]) <= kept and n <= 10
    assert set(order[n:]) & (everyone - kept)  # the others are drawn as unlabeled users
    with pytest.raises(ValueError, match="regime.labeled_users"):
        labeled_users(prepared, len(everyone) + 1)


def test_the_regime_section_is_checked_at_load():
    with pytest.raises(ConfigError, match="regime.pools"):
        RegimeConfig(pools=(5, 1))
    with pytest.raises(ConfigError, match="regime.repeats"):
        RegimeConfig(repeats=1)
    with pytest.raises(ConfigError, match="regime.ratios"):
        Params(regime=RegimeConfig(ratios=(0.3,)))
    assert RegimeConfig().pools == ()  # the root default runs nothing


def _run(c: Cell, valid: float, test: float) -> dict:
    """A cell result; its saved predictions (10 impressions of 5 users) are noise: only the
    test over users reads them."""
    rng = np.random.default_rng(zlib.crc32(f"{c.model}/{c.mode}/{c.seed}".encode()))
    pred = {"row": list(range(10)), "y": [0, 1] * 5, "score": rng.normal(size=10).tolist()}
    return {
        **c.__dict__,
        "valid": {"auc": valid, "ap": valid},
        "test": {"auc": test, "ap": test},
        "pred": pred,
    }


def test_the_edge_compares_methods_chosen_on_validation_not_on_test():
    """svd_feature_lr is best on validation, item_ctr on test: the edge is taken against
    svd_feature_lr; frozen wins validation, finetune test: the edge's pre-trained side is
    frozen. The gain is finetune - scratch, paired by seed."""
    runs = []
    for seed in (0, 1, 2):
        for model, mode, valid, test in [
            ("svd_feature_lr", "baseline", 0.70, 0.60),
            ("item_ctr", "baseline", 0.65, 0.66),
            ("nativectr", "frozen", 0.72, 0.62 + seed / 100),
            ("nativectr", "finetune", 0.71, 0.70 + seed / 100),
            ("nativectr", "scratch", 0.69, 0.64),
        ]:
            runs.append(_run(Cell("ctr", "click", model, mode, 1.0, seed), valid, test))
    users = [f"u{i // 2}" for i in range(10)]
    tests = comparisons(
        "ctr", runs, predictions_frame("ctr", runs, users), n_classes={}, n_boot=100, seed=0
    )
    rows = {(r["metric"], r["comparison"]): r for r in reg.compare("ctr", "nativectr", runs, tests)}
    edge = rows[("auc", "edge")]
    assert (edge["a"], edge["b"]) == ("nativectr/frozen", "svd_feature_lr/baseline")
    assert edge["diff"] == pytest.approx(0.03)  # mean of 0.02, 0.03, 0.04
    assert edge["ci_lo"] < edge["diff"] < edge["ci_hi"] and edge["wins"] == 3
    gain = rows[("auc", "gain")]
    assert (gain["a"], gain["b"]) == ("nativectr/finetune", "nativectr/scratch")
    assert gain["diff"] == pytest.approx(0.07) and gain["n"] == 3
    # Judged over repeats and over users: the larger p (none when either is undefined).
    for r in rows.values():
        both = None if None in (r["p_ttest"], r["p_users"]) else max(r["p_ttest"], r["p_users"])
        assert r["p"] == both
    assert edge["p"] is not None and gain["p"] is not None


def test_only_the_factor_baselines_cache_per_pool():
    keys = CellKeys(
        opts=None, demo_select="acc", class_weights=(), split=SPLIT, model_hashes={},
        data_hash="d", code_hash="c",
    )  # fmt: skip
    svd = Cell("ctr", "click", "svd_feature_lr", "baseline", 1.0, 0)
    item = Cell("ctr", "click", "item_ctr", "baseline", 1.0, 0)
    assert replace(keys, pool="a").key(svd) != replace(keys, pool="b").key(svd)
    assert replace(keys, pool="a").key(item) == replace(keys, pool="b").key(item) == keys.key(item)
    assert replace(keys, pool=None).key(svd) == keys.key(svd)
    # A labeled subset changes every cell.
    assert replace(keys, labeled="x").key(item) != keys.key(item)


@pytest.mark.slow
def test_run_pretrains_each_pool_once_and_compares_per_pool(few_labeled, tmp_path):
    prepared, tokenized = few_labeled / "prepared", few_labeled / "tokenized"
    _, n = pool_order(prepared)
    pre = PretrainConfig(architectures=("hsa",), model=SIZES, epochs=1, batch_size=32)
    trained: list[int] = []

    def pretrain(users: list[str], arch: str, out_dir, report_dir) -> None:
        trained.append(len(users))
        pretrain_one(
            pre,
            arch,
            prepared=prepared,
            tokenized=tokenized,
            max_behaviors=20,
            out_dir=out_dir,
            report_dir=report_dir,
            pool=users,
        )

    ft = FinetuneConfig(max_epochs=1, head_hidden=8, workers=1, class_weights=("none",))
    grid = grid_options(
        ft,
        split=SPLIT,
        prepared=prepared,
        tokenized=tokenized,
        max_behaviors=20,
        ckpt_root=tmp_path / "unused",
        cache_dir=tmp_path / "cache",
    )
    experiment = reg.Regime(
        models={"demo": "hsa"}, pools=(1, 2), ratios=(1.0,), repeats=2, bootstrap=100, seed=0
    )
    res = reg.run(
        experiment,
        grid,
        pretrain=pretrain,
        models_root=tmp_path / "models",
        pretrain_reports=tmp_path / "reports" / "pretrain",
    )
    assert trained == [n, 2 * n]
    for m in (1, 2):
        meta = checkpoint.read_meta(tmp_path / "models" / f"pool{m}" / "hsa")
        assert meta["pool"] == {"users": m * n, "sha256": users_digest(pool_users(prepared, m * n))}
    assert res["labeled_users"] == n
    rows = res["tasks"]["demo"]["rows"]
    labels = {r["label"] for r in rows}
    # Per pool, label and metric (acc, macro_f1): one gain and one edge.
    assert len(rows) == 2 * len(labels) * 2 * 2
    assert {(r["pool"], r["pool_users"]) for r in rows} == {(1, n), (2, 2 * n)}
    assert all(r["n"] == 2 and r["ci_lo"] <= r["diff"] <= r["ci_hi"] for r in rows)
    edges = [r for r in rows if r["comparison"] == "edge"]
    assert all(r["b"].endswith("/baseline") and r["a"].startswith("hsa/") for r in edges)
    # The second pool reuses every cached baseline cell but the factor one (svd_lr), and a
    # rerun computes nothing.
    cells = len(labels) * 2  # label x repeat
    n_base = len(DEMO_BASELINES)
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(cached) == cells * ((n_base - 1) + 2 * 1 + 2 * 3)
    again = reg.run(
        experiment,
        grid,
        pretrain=pretrain,
        models_root=tmp_path / "models",
        pretrain_reports=tmp_path / "reports" / "pretrain",
    )
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == cached
    assert again["tasks"]["demo"]["rows"] == rows
    assert "NaN" not in json.dumps(rows)  # valid JSON: an undefined p-value is null
    reg.write_outputs(
        res,
        json_path=tmp_path / "out" / "regime.json",
        md_path=tmp_path / "out" / "regime.md",
        figures=tmp_path / "out" / "figures",
        plot=tmp_path / "out" / "plot.json",
    )
    md = (tmp_path / "out" / "regime.md").read_text()
    assert f"| 2x | {2 * n} |" in md and "edge" in md
    assert (tmp_path / "out" / "figures" / "demo.png").stat().st_size > 0
    plot = json.loads((tmp_path / "out" / "plot.json").read_text())
    assert sorted(row["pool_users"] for row in plot) == [n, 2 * n]
    assert all(np.isfinite(v) for row in plot for k, v in row.items() if k != "pool_users")
