"""The one atomic directory swap and the one file checksum the trainer's writers share."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from kdistill.trainer import fsio
from kdistill.trainer.artifact import sha256_file as artifact_sha256


def test_sha256_file_matches_hashlib_across_blocks(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    data = bytes(range(256)) * 9000  # > 2 blocks of 1 MiB
    path.write_bytes(data)
    assert fsio.sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert artifact_sha256 is fsio.sha256_file  # the server reaches it through the artifact module


def test_replace_dir_puts_a_new_tree_in_place_and_removes_the_old(tmp_path: Path) -> None:
    final = tmp_path / "student"
    for version in ("one", "two"):
        tmp = tmp_path / "student.tmp"
        (tmp / "sub").mkdir(parents=True)
        (tmp / "sub" / "weights").write_text(version)
        fsio.replace_dir(tmp, final)
        assert (final / "sub" / "weights").read_text() == version
        assert not tmp.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]  # no .old left behind


def test_replace_dir_leaves_the_old_tree_when_the_new_one_is_missing(tmp_path: Path) -> None:
    final = tmp_path / "out"
    final.mkdir()
    (final / "f").write_text("old")
    with pytest.raises(FileNotFoundError):
        fsio.replace_dir(tmp_path / "never-written", final)
    assert (final / "f").read_text() == "old"


def test_write_text_atomic_replaces_whole_files(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "result.json"
    fsio.write_text_atomic(path, "first\n")
    fsio.write_text_atomic(path, "second\n")
    assert path.read_text() == "second\n"
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]
