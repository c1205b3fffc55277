"""deployments/source.sh: what the deployments' git_clone pull step clones, decided where `prefect deploy`
runs. Real git repositories in a temp dir; no server. The deploy itself, the workers and a run that clones
the code are in test_cluster.py."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.flows.conftest import REPO_ROOT

SOURCE = REPO_ROOT / "deployments" / "source.sh"
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@localhost"]

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def _git(*args: str, cwd: Path | None = None) -> None:
    subprocess.run([*GIT, *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _source(what: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("NEWSGROUPS_LSTM_REPO", "NEWSGROUPS_LSTM_BRANCH")}
    return subprocess.run(["sh", str(SOURCE), what], cwd=cwd, env={**base, **env}, capture_output=True, text=True,
                          timeout=60)


@pytest.fixture
def remote(tmp_path) -> tuple[str, Path]:
    """A bare repository with branch `work` (its file:// URL), and a clone of it checked out on `work`."""
    bare, checkout = tmp_path / "remote.git", tmp_path / "checkout"
    _git("init", "-q", "--bare", str(bare))
    _git("clone", "-q", bare.as_uri(), str(checkout))
    _git("checkout", "-q", "-b", "work", cwd=checkout)
    _git("commit", "-q", "--allow-empty", "-m", "first", cwd=checkout)
    _git("push", "-q", "origin", "work", cwd=checkout)
    return bare.as_uri(), checkout


def test_defaults_are_the_checkouts_origin_and_current_branch(remote):
    url, checkout = remote
    assert _source("repository", checkout).stdout == f"{url}\n"
    assert _source("branch", checkout).stdout == "work\n"


def test_the_environment_wins_and_the_branch_must_exist_there(remote, tmp_path):
    url, checkout = remote
    elsewhere = tmp_path / "no-git"
    elsewhere.mkdir()
    done = _source("repository", elsewhere, NEWSGROUPS_LSTM_REPO=url, NEWSGROUPS_LSTM_BRANCH="work")
    assert (done.returncode, done.stdout) == (0, f"{url}\n")

    # A branch that was never pushed fails the deploy, in one line naming the branch and the repository.
    _git("checkout", "-q", "-b", "local-only", cwd=checkout)
    done = _source("branch", checkout)
    assert done.returncode == 1
    assert done.stderr == f"deployments/source.sh: no branch 'local-only' in {url} (NEWSGROUPS_LSTM_BRANCH; push it first)\n"

    missing = (tmp_path / "missing.git").as_uri()
    done = _source("repository", elsewhere, NEWSGROUPS_LSTM_REPO=missing, NEWSGROUPS_LSTM_BRANCH="work")
    assert done.returncode == 1 and len(done.stderr.splitlines()) == 1
    assert done.stderr.startswith(f"deployments/source.sh: cannot read {missing} (NEWSGROUPS_LSTM_REPO): ")


def test_without_a_remote_it_asks_for_the_repository(tmp_path):
    done = _source("repository", tmp_path)
    assert done.returncode == 1
    assert "set NEWSGROUPS_LSTM_REPO to a git URL every worker can clone" in done.stderr
