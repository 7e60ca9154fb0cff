"""Uninterrupted reference runs of each stage on the tiny project, built once per session.

Each reference logs its file operations (the kill points of the faulty runs) and its wall time.
"""

from __future__ import annotations

import pytest

from tests.faults.harness import ARCH, Ref, copy_project, new_project, ptum, reference


@pytest.fixture(scope="session")
def base(tmp_path_factory) -> Ref:
    """ingest -> prepare (the reference prepare) -> tokenize."""
    proj = new_project(tmp_path_factory.mktemp("faults") / "base")
    run = ptum(proj, "ingest")
    assert run.rc == 0, run.explain()
    ref = reference(proj, "prepare")
    run = ptum(proj, "tokenize")
    assert run.rc == 0, run.explain()
    return ref


@pytest.fixture(scope="session")
def pretrained(base, tmp_path_factory) -> Ref:
    proj = copy_project(base.proj, tmp_path_factory.mktemp("faults") / "pretrained")
    return reference(proj, "pretrain", "--arch", ARCH)


@pytest.fixture(scope="session")
def finetuned(pretrained, tmp_path_factory) -> Ref:
    proj = copy_project(pretrained.proj, tmp_path_factory.mktemp("faults") / "finetuned")
    return reference(proj, "finetune", "--task", "demo")


@pytest.fixture(scope="session")
def exported(pretrained, tmp_path_factory) -> Ref:
    proj = copy_project(pretrained.proj, tmp_path_factory.mktemp("faults") / "exported")
    return reference(proj, "export", "--arch", ARCH)


@pytest.fixture(scope="session")
def tuned(base, tmp_path_factory) -> Ref:
    proj = copy_project(base.proj, tmp_path_factory.mktemp("faults") / "tuned")
    return reference(proj, "tune")
