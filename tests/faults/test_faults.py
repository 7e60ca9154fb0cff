"""SIGKILL at seeded points of each stage, then the same command again: the final artifacts
equal an uninterrupted run's.

A kill point is either the N-th file operation the reference run made under its project (drawn
with a fixed seed from the operations of interest, e.g. those of a checkpoint save) or a seeded
delay. A kill that lands after the run finished counts as an uninterrupted run.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import pytest

from tests.faults.harness import (
    ARCH,
    CKPT,
    GRACE_PERIOD,
    PARAMS,
    PRETRAIN,
    Ref,
    Run,
    assert_pretrain_equal,
    copy_project,
    flip_byte,
    ptum,
    reference,
    report,
    rerun,
    tree,
)

pytestmark = pytest.mark.slow

FINETUNE = ("finetune", "--task", "demo")
EXPORT = ("export", "--arch", ARCH)
ONNX = Path("models/onnx") / ARCH


def draw(seed: str, choices: list[int], i: int, k: int) -> int:
    """The i-th of k seeded draws from `choices`, one from each of its k consecutive parts
    (so that k draws spread over the run)."""
    part = choices[i * len(choices) // k : (i + 1) * len(choices) // k] or choices
    return random.Random(f"{seed}-{i}").choice(part)


def delay(seed: str, ref: Ref) -> float:
    """A seeded kill delay within the reference run's wall time."""
    return random.Random(seed).uniform(0.3, 0.95) * ref.seconds


def killed(run: Run) -> Run:
    assert run.rc in (-9, 0), run.explain()  # killed, or finished before the kill point
    return run


# --- pretrain ---------------------------------------------------------------------------------


def _last_switch(ref: Ref) -> int:
    """The event that makes the final checkpoint live (LATEST replaced)."""
    return max(i for i, op, path in ref.events if op == "replace" and path.startswith(str(CKPT)))


def _first_removal_after(ref: Ref, event: int) -> int:
    return min(i for i, op, _ in ref.events if i > event and op in ("unlink", "remove", "rmdir"))


@pytest.mark.parametrize("point", ["save-a", "save-b", "save-c", "time"])
def test_sigkill_pretrain_then_rerun_is_byte_equal(point, base, pretrained, tmp_path):
    # Points inside the checkpoint saves, up to the final save's switch of LATEST (its clean-up
    # afterwards: test_sigkill_in_the_final_saves_clean_up_then_rerun_is_byte_equal).
    saves = [i for i, _, path in pretrained.events if path.startswith(str(CKPT))]
    saves = [i for i in saves if i <= _last_switch(pretrained)]
    proj = copy_project(base.proj, tmp_path / "proj")
    if point == "time":
        killed(ptum(proj, *PRETRAIN, kill_after=delay("pretrain", pretrained)))
    else:
        killed(ptum(proj, *PRETRAIN, kill_at=draw("pretrain", saves, "abc".index(point[-1]), 3)))
    rerun(proj, *PRETRAIN)
    assert_pretrain_equal(proj, pretrained.proj)


def test_killed_before_the_old_checkpoint_is_removed_a_corrupt_live_one_falls_back(
    base, pretrained, tmp_path
):
    """Killed after the final save switched LATEST, before it removed the previous checkpoint:
    both are complete. With the live one corrupted, the rerun warns, resumes from the earlier
    one and ends byte-equal to an uninterrupted run."""
    proj = copy_project(base.proj, tmp_path / "proj")
    at = _first_removal_after(pretrained, _last_switch(pretrained))
    assert ptum(proj, *PRETRAIN, kill_at=at).rc == -9
    live = (proj / CKPT / "LATEST").read_text().strip()
    names = sorted(d.name for d in (proj / CKPT).iterdir() if d.is_dir())
    assert len(names) == 2 and names[-1] == live, names
    corrupt = CKPT / live / "model.safetensors"
    flip_byte(proj / corrupt)
    run = rerun(proj, *PRETRAIN)
    assert f"using the earlier complete checkpoint {names[0]}" in run.stderr, run.stderr
    assert str(corrupt) in run.stderr
    assert_pretrain_equal(proj, pretrained.proj)


def test_sigkill_in_the_final_saves_clean_up_then_rerun_is_byte_equal(base, pretrained, tmp_path):
    proj = copy_project(base.proj, tmp_path / "proj")
    at = _first_removal_after(pretrained, _last_switch(pretrained)) + 1
    assert ptum(proj, *PRETRAIN, kill_at=at).rc == -9
    rerun(proj, *PRETRAIN)
    assert_pretrain_equal(proj, pretrained.proj)


# --- prepare ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reprepared(base, tmp_path_factory) -> Ref:
    """A prepare run over an existing data/prepared (its operations include the swap)."""
    proj = copy_project(base.proj, tmp_path_factory.mktemp("faults") / "reprepared")
    return reference(proj, "prepare")


@pytest.mark.parametrize("point", ["fresh-a", "fresh-b", "over-a", "over-b", "swap"])
def test_sigkill_prepare_never_exposes_a_partial_output(point, base, reprepared, tmp_path):
    out, expected = Path("data/prepared"), tree(base.proj / "data/prepared")
    proj = copy_project(base.proj, tmp_path / "proj")
    if point.startswith("fresh"):
        shutil.rmtree(proj / out)
        at = draw("fresh", [i for i, *_ in base.events], "ab".index(point[-1]), 2)
    elif point.startswith("over"):
        at = draw("over", [i for i, *_ in reprepared.events], "ab".index(point[-1]), 2)
    else:  # just after the previous output is moved aside, before the new one is moved in
        at = 1 + min(i for i, op, p in reprepared.events if op == "rename" and p == str(out))
    killed(ptum(proj, "prepare", kill_at=at))
    # Visible: the complete output (old or new, equal here) or none, never a part of one.
    assert not (proj / out).exists() or tree(proj / out) == expected
    rerun(proj, "prepare")
    assert tree(proj / out) == expected
    assert tree(reprepared.proj / out) == expected  # and prepare is deterministic


# --- finetune ---------------------------------------------------------------------------------


def assert_finetune_equal(proj: Path, ref: Path) -> None:
    reports = Path("reports/finetune")
    assert report(proj / reports / "demo.json") == report(ref / reports / "demo.json")
    assert report(proj / reports / "demo_metrics.json") == report(
        ref / reports / "demo_metrics.json"
    )
    cache = Path("models/finetune_cache/demo")
    assert sorted(p.name for p in (proj / cache).glob("*.json")) == sorted(
        p.name for p in (ref / cache).glob("*.json")
    )


@pytest.mark.parametrize("point", ["io", "time"])
def test_sigkill_finetune_then_rerun_gives_the_same_results(point, pretrained, finetuned, tmp_path):
    proj = copy_project(pretrained.proj, tmp_path / "proj")
    if point == "time":
        killed(ptum(proj, *FINETUNE, kill_after=delay("finetune", finetuned)))
    else:
        at = draw("finetune", [i for i, *_ in finetuned.events], 0, 1)
        killed(ptum(proj, *FINETUNE, kill_at=at))
    rerun(proj, *FINETUNE)
    assert_finetune_equal(proj, finetuned.proj)


# --- tune -------------------------------------------------------------------------------------


def _tune_then_rerun(proj: Path, tuned: Ref, **kill) -> Run:
    first = killed(ptum(proj, "tune", **kill))
    time.sleep(GRACE_PERIOD + 1)  # a killed trial's heartbeat goes stale
    rerun(proj, "tune")
    return first


def assert_study_complete(proj: Path, tuned: Ref, first: Run) -> None:
    study = json.loads((proj / "reports/tune/figures/study.json").read_text())
    ref = json.loads((tuned.proj / "reports/tune/figures/study.json").read_text())
    assert study["study"] == ref["study"]  # the same study, resumed
    trials = study["trials"]
    assert trials["complete"] + trials["pruned"] == PARAMS["tune"]["n_trials"], trials
    assert trials["running"] == trials["waiting"] == 0, trials
    assert trials["fail"] <= 1, trials  # at most the killed trial
    best = json.loads((proj / "reports/tune/best_params.json").read_text())
    assert all(isinstance(best[k], int | float) for k in ("k", "lam", "p", "lr", "value"))
    if first.rc == 0:
        assert best == json.loads((tuned.proj / "reports/tune/best_params.json").read_text())


@pytest.fixture(scope="module")
def tune_killed_in_a_trial(base, tuned, tmp_path_factory) -> tuple[Path, Run]:
    """`ptum tune` killed at a seeded file operation of a trial's pre-training, then rerun."""
    proj = copy_project(base.proj, tmp_path_factory.mktemp("faults") / "tune")
    trials = [i for i, _, path in tuned.events if path.startswith("data/tune/trials")]
    return proj, _tune_then_rerun(proj, tuned, kill_at=draw("tune", trials, 0, 1))


def test_sigkill_in_a_trial_then_rerun_completes_the_study(tune_killed_in_a_trial, tuned):
    proj, first = tune_killed_in_a_trial
    assert first.rc == -9
    assert_study_complete(proj, tuned, first)


def test_sigkill_tune_at_a_time_then_rerun_completes_the_study(base, tuned, tmp_path):
    proj = copy_project(base.proj, tmp_path / "proj")
    first = _tune_then_rerun(proj, tuned, kill_after=delay("tune", tuned))
    assert_study_complete(proj, tuned, first)


def test_a_killed_trial_leaves_no_work_behind(tune_killed_in_a_trial):
    proj, _ = tune_killed_in_a_trial
    assert not list((proj / "data/tune/trials").iterdir())


# --- export -----------------------------------------------------------------------------------


def test_sigkill_export_then_rerun_is_byte_equal(pretrained, exported, tmp_path):
    proj = copy_project(pretrained.proj, tmp_path / "proj")
    killed(ptum(proj, *EXPORT, kill_at=draw("export", [i for i, *_ in exported.events], 0, 1)))
    assert not (proj / ONNX).exists() or tree(proj / ONNX) == tree(exported.proj / ONNX)
    rerun(proj, *EXPORT)
    assert tree(proj / ONNX) == tree(exported.proj / ONNX)


def test_sigkill_while_an_export_replaces_the_previous_one(exported, tmp_path):
    """A re-export killed at a seeded point after its last new file is written, while it puts
    the new export in place of the previous one: the point is drawn from the fresh export's
    operations after its last write, plus one removal per file of the previous export."""
    proj = copy_project(exported.proj, tmp_path / "proj")
    expected = tree(exported.proj / ONNX)
    last_write = max(i for i, op, _ in exported.events if op.startswith("open"))
    end = len(exported.events) + len(expected) + 1
    killed(ptum(proj, *EXPORT, kill_at=draw("re-export", list(range(last_write + 1, end)), 0, 1)))
    # Visible: the previous export or the new one (equal here) or none, never a mix.
    assert not (proj / ONNX).exists() or tree(proj / ONNX) == expected
    rerun(proj, *EXPORT)
    assert tree(proj / ONNX) == expected
