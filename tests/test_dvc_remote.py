"""The DVC remote: the project's default is a directory outside the repository, and
`dvc push` / `dvc pull` restore a pipeline's outputs in a fresh clone without recomputing them.

The round trip runs in a small git + DVC repository made here (one stage writing a file and a
checkpoint directory), with the project's .dvc/config and its remote pointed at a temp directory.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIT = ["git", "-c", "user.name=ptum-test", "-c", "user.email=test@ptum.invalid"]


def _dvc(cwd: Path, *args: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True, check=True
    ).stdout


def _git(cwd: Path, *args: str) -> None:
    subprocess.run([*GIT, *args], cwd=cwd, capture_output=True, check=True)


def test_default_remote_is_a_directory_outside_the_repository():
    remotes = _dvc(ROOT, "remote", "list", "--project").split()
    assert "(default)" in remotes
    url = Path(remotes[remotes.index("(default)") - 1])
    assert url.is_absolute() and ROOT not in url.parents and url != ROOT, url


def test_every_result_set_pushes_to_the_same_default_remote():
    """experiments/* are DVC projects of their own: their outputs (hours of cells) go to the
    root's remote, so a new checkout restores them with `dvc pull`."""
    root = _dvc(ROOT, "remote", "list", "--project").split()
    sets = sorted(p.parent for p in (ROOT / "experiments").glob("*/.dvc"))
    assert len(sets) >= 4
    for d in sets:
        remotes = _dvc(d, "remote", "list", "--project").split()
        assert "(default)" in remotes, d
        assert remotes[remotes.index("(default)") - 1] == root[root.index("(default)") - 1], d


def test_push_then_pull_in_a_fresh_clone_restores_outputs_without_recomputing(tmp_path):
    repo, remote, clone = tmp_path / "repo", tmp_path / "remote", tmp_path / "clone"
    repo.mkdir()
    _git(repo, "init", "-q")
    _dvc(repo, "init", "-q")
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    _dvc(repo, "remote", "modify", "local", "url", str(remote))
    # A stage that counts its runs in a file outside the repository: a recompute would show.
    runs = tmp_path / "runs.txt"
    (repo / "train.py").write_text(
        "import json, pathlib\n"
        "pathlib.Path('data').mkdir(exist_ok=True)\n"
        "pathlib.Path('models/ckpt').mkdir(parents=True, exist_ok=True)\n"
        "pathlib.Path('data/tokens.txt').write_text('a b c')\n"
        "pathlib.Path('models/ckpt/model.bin').write_bytes(bytes(range(256)))\n"
        "pathlib.Path('metrics.json').write_text(json.dumps({'acc': 0.5}))\n"
        f"open({str(runs)!r}, 'a').write('run\\n')\n",
        encoding="utf-8",
    )
    (repo / "dvc.yaml").write_text(
        "stages:\n"
        "  train:\n"
        f"    cmd: {sys.executable} train.py\n"
        "    deps:\n      - train.py\n"
        "    outs:\n      - data\n      - models/ckpt\n"
        "    metrics:\n      - metrics.json:\n          cache: false\n",
        encoding="utf-8",
    )
    _dvc(repo, "repro", "-q")
    assert runs.read_text() == "run\n"
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "pipeline")
    _dvc(repo, "push", "-q")

    _git(tmp_path, "clone", "-q", str(repo), str(clone))
    assert not (clone / "models" / "ckpt").exists()
    _dvc(clone, "pull", "-q")
    assert (clone / "models/ckpt/model.bin").read_bytes() == bytes(range(256))
    assert (clone / "data/tokens.txt").read_text() == "a b c"
    assert json.loads(_dvc(clone, "status", "--json")) == {}
    _dvc(clone, "repro")  # up to date: nothing runs
    assert runs.read_text() == "run\n"
