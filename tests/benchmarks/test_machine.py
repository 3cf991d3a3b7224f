"""The revision results are labelled with (probe IC #4: `ours` read .git by hand and said "unknown" once refs were
packed or in a worktree, and no label marked uncommitted code)."""

import subprocess
from pathlib import Path

from benchmarks.machine import git_revision


def _git(folder: Path, *args: str) -> str:
    command = ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args]
    return subprocess.run(command, cwd=folder, check=True, capture_output=True, text=True).stdout.strip()


def test_the_revision_reads_packed_refs_and_worktrees_and_marks_changes(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "file.txt").write_text("one\n")
    _git(repo, "add", "file.txt")
    _git(repo, "commit", "-qm", "one")
    _git(repo, "pack-refs", "--all")
    head = _git(repo, "rev-parse", "--short=12", "HEAD")
    assert git_revision(repo) == head
    _git(repo, "worktree", "add", "-q", str(tmp_path / "tree"))
    assert git_revision(tmp_path / "tree") == head
    (repo / "untracked.txt").write_text("not part of the code\n")
    assert git_revision(repo) == head
    (repo / "file.txt").write_text("two\n")
    assert git_revision(repo) == f"{head}-dirty"
    assert git_revision(tmp_path) is None  # not a checkout
