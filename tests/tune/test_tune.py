"""Optuna tuning: a study runs on validation metrics only, is reproducible, survives a killed
process, takes several workers on one SQLite file, and optuna-dashboard can read it."""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from ptum.config import PretrainConfig, TuneConfig
from ptum.data.corpus import file_digest
from ptum.finetune.options import CellOptions
from ptum.stages.pretrain import train_options
from ptum.stages.tune import study_spec
from ptum.tune import (
    SearchSpace,
    StudySpec,
    TrialSetup,
    default_study_name,
    make_pruner,
    tune,
    write_outputs,
    write_plots,
)

ROOT = Path(__file__).resolve().parents[2]
TINY_MODEL = {
    "word_dim": 16,
    "dim": 16,
    "heads": 2,
    "head_dim": 8,
    "attn_hidden": 16,
    "dropout": 0.0,
    "layers": 1,
}
SPACE = SearchSpace(k=(1, 5), lam=(0.0, 0.25, 0.5, 1.0, 2.0, 4.0), p=(1, 16), lr=(1e-4, 1e-2))
PNG = b"\x89PNG\r\n\x1a\n"
DATA_FILES = ("sequences.parquet", "users.parquet", "labels.parquet", "tokens.npy")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Trials are tiny; on a shared 2-CPU machine, intra-op threads only add contention.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _setup(root: Path, tmp: Path, **kw) -> TrialSetup:
    fields = {"demo_select": "acc", "multi_objective": False, "device": "auto"} | kw
    return TrialSetup(
        prepared=root / "prepared",
        tokenized=root / "tokenized",
        max_behaviors=20,
        arch="hsa",
        model_sizes=TINY_MODEL,
        space=SPACE,
        behavior_encoder="",
        # The tiny trial sizes; lr and deterministic as these tests always ran them.
        base=replace(
            train_options(PretrainConfig()),
            epochs=2,
            batch_size=32,
            seed=5,
            lr=1e-3,
            deterministic=False,
        ),
        finetune=CellOptions(
            lr=1e-3,
            batch_size=32,
            max_epochs=2,
            patience=1,
            head_hidden=16,
            weight_decay=0.0,
            encoder_lr_scale=1.0,
            ctr_scoring="dot",
            bias_lr_scale=1.0,
            demo_wide=False,
        ),
        prune_head_epochs=3,
        work_dir=tmp / "trials",
        **fields,
    )


def _spec(tmp: Path, name: str = "s", db: str = "optuna.db", **kw) -> StudySpec:
    """params.yaml's tune section with a study of 3 trials in `tmp`."""
    spec = study_spec(TuneConfig(), study_name=name)
    return replace(spec, **{"storage": f"sqlite:///{tmp / db}", "n_trials": 3, "seed": 11, **kw})


def _trials(spec: StudySpec) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=spec.study_name, storage=spec.storage).trials


@pytest.fixture(scope="module")
def finished(tiny_pipeline, tmp_path_factory):
    """One 3-trial study (median pruner), its outputs and summary."""
    tmp = tmp_path_factory.mktemp("tune")
    spec = _spec(tmp, name="ptum-hsa")
    summary = tune(
        setup=_setup(tiny_pipeline, tmp),
        spec=spec,
        best_params_path=tmp / "best_params.json",
        reports_dir=tmp / "reports",
    )
    return tmp, spec, summary


def test_study_scores_validation_metrics_and_writes_outputs(finished):
    tmp, spec, summary = finished
    trials = _trials(spec)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    for t in trials:
        assert 0.0 <= t.value <= 1.0
        assert set(t.intermediate_values) == {1, 2}  # one report per pre-training epoch
        assert all(0.0 <= v <= 1.0 for v in t.intermediate_values.values())
        assert t.user_attrs["seed"] == 5 + t.number  # trial i trains with seed + i
    best = json.loads((tmp / "best_params.json").read_text())
    top = max(trials, key=lambda t: t.value)
    assert best["trial"] == top.number and best["value"] == pytest.approx(top.value)
    assert 1 <= best["k"] <= 5 and 1 <= best["p"] <= 16 and best["lam"] in SPACE.lam
    assert 1e-4 <= best["lr"] <= 1e-2
    assert {k: best[k] for k in ("k", "lam", "p", "lr")} == top.params
    assert best["complete"] == 3 and best["pruned"] == best["fail"] == best["surplus"] == 0
    assert summary["trial"] == top.number
    # The detail (study name, every state's count) beside the figures, not among the metrics.
    detail = json.loads((tmp / "reports" / "study.json").read_text())
    assert detail["study"] == spec.study_name and detail["trials"]["complete"] == 3
    counts = ("complete", "pruned", "fail", "surplus")
    assert {k: detail[k] for k in best if k not in counts} == {
        k: v for k, v in best.items() if k not in counts
    }
    for name in ("optimization_history", "intermediate_values"):
        assert (tmp / "reports" / f"{name}.png").read_bytes()[:8] == PNG, name
    # Importances: a plot, or a note saying why 3 trials were too few (see the test below).
    imp = tmp / "reports" / "param_importances"
    assert imp.with_suffix(".png").exists() != imp.with_suffix(".txt").exists()
    assert not list((tmp / "trials").iterdir()), "per-trial checkpoints must be removed"


def _numbers(metrics: dict) -> int:
    """How many values `dvc metrics show` lists for a metrics file (nested dicts flattened)."""
    return sum(_numbers(v) if isinstance(v, dict) else 1 for v in metrics.values())


def test_headline_metrics_are_a_dozen_numbers(finished):
    tmp, _, _ = finished
    best = json.loads((tmp / "best_params.json").read_text())
    assert list(best) == [
        "trial",
        "k",
        "lam",
        "p",
        "lr",
        "value",
        "complete",
        "pruned",
        "fail",
        "surplus",
    ]
    assert all(isinstance(v, int | float) for v in best.values())
    assert _numbers(best) <= 12


def test_surplus_trials_are_counted_apart_from_failures(tmp_path):
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(0))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(lambda t: (SPACE.suggest(t), 0.4 + 0.1 * t.number)[1], n_trials=2)
    fail = optuna.trial.TrialState.FAIL
    study.add_trial(optuna.trial.create_trial(state=fail, user_attrs={"surplus": "2 held 2"}))
    study.add_trial(optuna.trial.create_trial(state=fail, user_attrs={"surplus": "2 held 2"}))
    study.add_trial(optuna.trial.create_trial(state=fail))  # a trial that really failed
    detail = write_outputs(
        study,
        best_params_path=tmp_path / "best.json",
        reports_dir=tmp_path / "reports",
        objective_names=["demo_valid_acc"],
    )
    best = json.loads((tmp_path / "best.json").read_text())
    assert (best["complete"], best["fail"], best["surplus"]) == (2, 1, 2)
    assert best["trial"] == 1 and best["value"] == pytest.approx(0.5)
    assert detail["trials"] == {
        "complete": 2,
        "pruned": 0,
        "fail": 1,
        "surplus": 2,
        "running": 0,
        "waiting": 0,
    }


def test_a_pruned_trial_stops_after_the_epoch_it_was_pruned_at(tiny_pipeline, tmp_path):
    # Every value is below 1.5, so this pruner stops each trial at its first report.
    spec = _spec(tmp_path, n_trials=2, pruner=optuna.pruners.ThresholdPruner(lower=1.5))
    with pytest.raises(ValueError, match="no completed trial"):
        tune(
            setup=_setup(tiny_pipeline, tmp_path, demo_labels=("gender",)),
            spec=spec,
            best_params_path=tmp_path / "best.json",
            reports_dir=tmp_path / "reports",
        )
    trials = _trials(spec)
    assert [t.state for t in trials] == [TrialState.PRUNED] * 2
    assert all(list(t.intermediate_values) == [1] for t in trials)
    assert not (tmp_path / "best.json").exists()


def test_importance_plot_is_skipped_with_a_note_until_it_means_something(tmp_path):
    def study(values: list[float]) -> optuna.Study:
        s = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
        for v in values:
            s.optimize(lambda t, v=v: (SPACE.suggest(t), v)[1], n_trials=1)
        return s

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = write_plots(study([0.5]), tmp_path / "one", ["demo_valid_acc"])
    assert out["param_importances"].startswith("skipped")
    assert "completed trials" in (tmp_path / "one" / "param_importances.txt").read_text()
    assert (tmp_path / "one" / "optimization_history.png").read_bytes()[:8] == PNG
    # Ties at the top: PED-ANOVA's top and reference sets coincide, all importances equal.
    out = write_plots(study([0.5] * 4), tmp_path / "ties", ["demo_valid_acc"])
    assert "equal" in out["param_importances"]
    out = write_plots(study([0.1, 0.4, 0.2, 0.9, 0.3]), tmp_path / "ok", ["demo_valid_acc"])
    assert (tmp_path / "ok" / "param_importances.png").read_bytes()[:8] == PNG
    assert not (tmp_path / "ok" / "param_importances.txt").exists()


def test_pruner_choices():
    assert isinstance(make_pruner("median", epochs=3), optuna.pruners.MedianPruner)
    assert isinstance(make_pruner("hyperband", epochs=3), optuna.pruners.HyperbandPruner)
    assert isinstance(make_pruner("none", epochs=3), optuna.pruners.NopPruner)
    with pytest.raises(ValueError, match="unknown pruner"):
        make_pruner("asha", epochs=3)
    with pytest.raises(ValueError, match="k range"):
        replace(SPACE, k=(0, 3))


def test_default_study_name_is_readable_and_follows_what_a_trial_measures(tiny_pipeline, tmp_path):
    setup = _setup(tiny_pipeline, tmp_path)
    name = default_study_name(setup, 0)
    data = file_digest(
        [tiny_pipeline / "prepared" / f for f in DATA_FILES[:3]]
        + [tiny_pipeline / "tokenized" / DATA_FILES[3]]
    )
    assert re.fullmatch(rf"ptum-hsa-demo-acc-data{data[:8]}-cfg[0-9a-f]{{6}}", name), name
    assert name == default_study_name(setup, 0)
    assert name == default_study_name(replace(setup, work_dir=tmp_path / "x", device="cpu"), 0)
    for other in (
        replace(setup, space=replace(SPACE, p=(1, 8))),
        replace(setup, base=replace(setup.base, epochs=3)),
        replace(setup, demo_labels=("gender",)),
    ):
        assert default_study_name(other, 0).startswith("ptum-hsa-demo-acc-data")
        assert default_study_name(other, 0) != name
    assert default_study_name(setup, 1) != name
    f1 = default_study_name(replace(setup, demo_select="macro_f1"), 0)
    assert f1.startswith("ptum-hsa-demo-macro_f1-data")
    multi = default_study_name(replace(setup, multi_objective=True), 0)
    assert multi.startswith("ptum-hsa-demo-acc+ctr-auc-data")


def test_study_records_what_it_measures(finished, tiny_pipeline):
    _, spec, _ = finished
    study = optuna.load_study(study_name=spec.study_name, storage=spec.storage)
    a = study.user_attrs
    assert a["arch"] == "hsa" and a["params_section"] == "tune"
    assert a["objectives"] == ["demo_valid_acc"] and a["directions"] == ["maximize"]
    assert a["data_sha256"] == file_digest(
        [tiny_pipeline / "prepared" / f for f in DATA_FILES[:3]]
        + [tiny_pipeline / "tokenized" / DATA_FILES[3]]
    )
    assert a["data_files"] == list(DATA_FILES)
    # The value and the intermediate values: same metric, different models, and said so.
    assert "validation acc" in a["value"] and "fine-tuning" in a["value"]
    assert "validation acc" in a["intermediate_value"]
    assert "frozen" in a["intermediate_value"] and "1..2" in a["intermediate_value"]
    assert a["config"]["space"]["p"] == [1, 16] and a["pretrain_epochs"] == 2
    assert study.metric_names == ["demo_valid_acc"]


def test_multi_objective_reports_the_pareto_front(tiny_pipeline, tmp_path):
    spec = _spec(tmp_path, n_trials=2, seed=3)
    summary = tune(
        setup=_setup(tiny_pipeline, tmp_path, multi_objective=True, demo_labels=("gender",)),
        spec=spec,
        best_params_path=tmp_path / "best.json",
        reports_dir=tmp_path / "reports",
    )
    study = optuna.load_study(study_name=spec.study_name, storage=spec.storage)
    assert len(study.directions) == 2
    for t in study.trials:
        assert t.state == TrialState.COMPLETE and len(t.values) == 2
        assert all(0.0 <= v <= 1.0 for v in t.values)
        assert not t.intermediate_values  # no pruning (nor reports) with two objectives
    front = {t.number for t in study.best_trials}
    best = json.loads((tmp_path / "best.json").read_text())
    detail = json.loads((tmp_path / "reports" / "study.json").read_text())
    assert {e["trial"] for e in detail["pareto_front"]} == front and best["trial"] in front
    assert set(best["values"]) == {"demo_valid_acc", "ctr_valid_auc"}
    assert best["value"] == pytest.approx(sum(best["values"].values()) / 2)
    assert summary["trials"]["complete"] == 2 and best["complete"] == 2
    assert _numbers(best) <= 12, "dvc metrics show: at most a dozen numbers"
    assert (tmp_path / "reports" / "pareto_front.png").read_bytes()[:8] == PNG


def test_single_worker_study_is_reproducible(tiny_pipeline, tmp_path):
    runs = []
    for db in ("a.db", "b.db"):
        spec = _spec(tmp_path, db=db, n_trials=3, pruner="none")
        tune(
            setup=_setup(tiny_pipeline, tmp_path, demo_labels=("gender",)),
            spec=spec,
            best_params_path=tmp_path / f"{db}.json",
            reports_dir=tmp_path / f"rep-{db}",
        )
        runs.append([(t.params, t.value, t.intermediate_values) for t in _trials(spec)])
    assert runs[0] == runs[1]
    assert len({tuple(sorted(p.items())) for p, _, _ in runs[0]}) == 3  # distinct draws


_CHILD = """
import pickle, sys, time
from pathlib import Path
import torch
import ptum.tune.objective as objective
from ptum.tune import run_worker
torch.set_num_threads(1)
setup, spec, marker = pickle.loads(Path(sys.argv[1]).read_bytes())
pretrain = objective.pretrain
def slow_second_trial(**kw):
    out = pretrain(**kw)
    if kw["meta"]["tune_trial"] == 1:  # pre-trained; now hang until killed
        Path(marker).touch()
        time.sleep(300)
    return out
objective.pretrain = slow_second_trial
run_worker(spec, setup, spec.n_trials)
"""


@pytest.mark.slow
def test_killed_study_resumes_and_marks_the_killed_trial_failed(tiny_pipeline, tmp_path):
    setup = _setup(tiny_pipeline, tmp_path, demo_labels=("gender",))
    # No pruner: whether a resumed trial would be pruned depends on the values, not on resuming.
    spec = _spec(tmp_path, n_trials=3, heartbeat_interval=1, grace_period=2, pruner="none")
    marker = tmp_path / "trial1_running"
    (tmp_path / "job.pkl").write_bytes(pickle.dumps((setup, spec, str(marker))))
    (tmp_path / "child.py").write_text(_CHILD)
    child = subprocess.Popen(
        [sys.executable, str(tmp_path / "child.py"), str(tmp_path / "job.pkl")], cwd=ROOT
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert child.poll() is None, "the study process ended before trial 1 ran"
            assert time.monotonic() < deadline, "trial 1 never started"
            time.sleep(0.1)
        time.sleep(1.5)  # a heartbeat or two while trial 1 hangs
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    before = _trials(spec)
    assert [t.state for t in before] == [TrialState.COMPLETE, TrialState.RUNNING]
    time.sleep(spec.grace_period + 2)  # the killed trial's heartbeat goes stale
    tune(
        setup=setup,
        spec=spec,
        best_params_path=tmp_path / "best.json",
        reports_dir=tmp_path / "reports",
    )
    after = _trials(spec)
    assert after[1].state == TrialState.FAIL  # not RUNNING forever
    assert [t.state for t in after].count(TrialState.COMPLETE) == 3
    assert TrialState.RUNNING not in [t.state for t in after]
    # The killed trial's parameters were queued again once (retry_killed=1).
    retry = [t for t in after if t.system_attrs.get("failed_trial") == 1]
    assert len(retry) == 1 and retry[0].params == after[1].params
    assert retry[0].state == TrialState.COMPLETE


@pytest.mark.slow
def test_two_workers_share_one_sqlite_study(tiny_pipeline, tmp_path, capfd):
    spec = _spec(tmp_path, n_trials=4, pruner="none")
    summary = tune(
        setup=_setup(tiny_pipeline, tmp_path, demo_labels=("gender",)),
        spec=spec,
        best_params_path=tmp_path / "best.json",
        reports_dir=tmp_path / "reports",
        n_workers=2,
    )
    trials = _trials(spec)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    # A worker that lost the race for the last place may have created one more trial (at most
    # one per worker: it then stops): it ended FAIL before its objective ran and says why.
    surplus = [t for t in trials if t.state != TrialState.COMPLETE]
    assert len(done) == 4 and len(surplus) <= 2
    assert all(t.state == TrialState.FAIL and "surplus" in t.user_attrs for t in surplus)
    assert all(not t.params for t in surplus)
    # Counted as such in best_params.json, not as failures.
    assert summary["trials"] == {
        "complete": 4,
        "pruned": 0,
        "fail": 0,
        "surplus": len(surplus),
        "running": 0,
        "waiting": 0,
    }
    best = json.loads((tmp_path / "best.json").read_text())
    assert (best["fail"], best["surplus"]) == (0, len(surplus))
    # Each worker has its own sampler seed, so the workers do not draw the same points.
    assert len({tuple(sorted(t.params.items())) for t in done}) == 4
    err = capfd.readouterr().err
    assert "database is locked" not in err and "OperationalError" not in err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def test_optuna_dashboard_reads_the_study(finished):
    _, spec, _ = finished
    port = _free_port()
    exe = Path(sys.executable).with_name("optuna-dashboard")
    server = subprocess.Popen(
        [str(exe), spec.storage, "--host", "127.0.0.1", "--port", str(port), "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, server.stderr.read().decode()
            try:
                studies = _get(f"{base}/api/studies")["study_summaries"]
                break
            except OSError:
                assert time.monotonic() < deadline, "optuna-dashboard did not answer"
                time.sleep(0.3)
        (study,) = [s for s in studies if s["study_name"] == spec.study_name]
        assert study["directions"] == ["maximize"]
        detail = _get(f"{base}/api/studies/{study['study_id']}")
        assert detail["name"] == spec.study_name
        assert len(detail["trials"]) == 3
        assert detail["has_intermediate_values"]
        assert all(
            t["state"] == "Complete" and len(t["intermediate_values"]) == 2
            for t in detail["trials"]
        )
        assert {p["name"] for p in detail["trials"][0]["params"]} == {"k", "lam", "p", "lr"}
        # What the study measures is on the study's page.
        attrs = {a["key"]: a["value"] for a in detail["user_attrs"]}
        assert {"arch", "data_sha256", "objectives", "value", "intermediate_value"} <= set(attrs)
        assert detail["objective_names"] == ["demo_valid_acc"]
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.parametrize("multi_objective", [False, True])
def test_no_task_to_score_trials_on_is_reported_without_a_study(
    behaviors_only, tmp_path, multi_objective
):
    """The PTUM layout (behaviors only): no study is opened, best_params.json says why."""
    setup = replace(_setup(behaviors_only, tmp_path), multi_objective=multi_objective)
    db = tmp_path / "optuna.db"
    spec = _spec(tmp_path, n_trials=2, seed=0)
    out = tmp_path / "reports"
    summary = tune(
        setup=setup, spec=spec, best_params_path=out / "best.json", reports_dir=out / "figures"
    )
    why = "demo: no label columns (the source has no labels table)"
    if multi_objective:
        why += "; ctr: no impressions (the source has no impressions table, or it is empty)"
    assert summary == {"available": False, "why_not": why}
    assert json.loads((out / "best.json").read_text()) == {
        **summary,
        "k": None,
        "lam": None,
        "p": None,
        "lr": None,
    }
    assert json.loads((out / "figures" / "study.json").read_text()) == summary
    assert not db.exists() and setup.work_dir is not None and setup.work_dir.is_dir()


def test_a_failed_or_killed_local_worker_is_one_line_that_says_how_to_resume(monkeypatch):
    import ptum.stages.tune as stage
    from ptum.stages.errors import StageError
    from ptum.tune.search import WorkerFailed, _how_it_ended

    assert _how_it_ended("tune-worker-1", -9) == "tune-worker-1 was killed by SIGKILL"
    assert (
        _how_it_ended("tune-worker-0", 1)
        == "tune-worker-0 failed (exit code 1, its error is above)"
    )
    with pytest.raises(StageError, match=r"^tune: tune-worker-1 was killed by SIGKILL; .*rerun"):
        with stage._worker_failures():
            raise WorkerFailed("tune-worker-1 was killed by SIGKILL; rerun `ptum tune`")
