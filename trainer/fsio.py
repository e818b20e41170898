"""Durable, atomic file-system writes and file checksums: the one copy the checkpoint, the
teacher cache, the served artifact and the run's outputs share.

A reader sees the old version or the new one, never a mix: content goes to a temporary path,
is fsync'ed, then renamed over the final path, and the parent directory is fsync'ed so the
rename itself survives a crash. ``replace_dir`` does this for a whole directory tree.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

_BLOCK = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_file(path: Path) -> None:
    with Path(path).open("rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make renames and new entries in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under ``root``, then every directory, deepest first."""
    root = Path(root)
    dirs = [root]
    for p in root.rglob("*"):
        if p.is_dir():
            dirs.append(p)
        elif p.is_file():
            fsync_file(p)
    for d in sorted(dirs, key=lambda d: len(d.parts), reverse=True):
        fsync_dir(d)


def replace_file(tmp: Path, final: Path) -> None:
    """Rename a written and fsync'ed ``tmp`` over ``final`` and make the rename durable."""
    os.replace(tmp, final)
    fsync_dir(Path(final).parent)


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    replace_file(tmp, path)


def replace_dir(tmp: Path, final: Path, *, synced: bool = False) -> None:
    """Put the finished directory ``tmp`` at ``final``, replacing what is there.

    ``tmp`` is fsync'ed first (unless the caller did: ``synced``). An existing ``final`` is
    renamed aside to ``final.old`` and removed only after the new one is in place, so a crash
    leaves either version whole at ``final`` (or, between the two renames, the old one at
    ``final.old``)."""
    tmp, final = Path(tmp), Path(final)
    if not synced:
        fsync_tree(tmp)
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        fsync_dir(final.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
        fsync_dir(final.parent)
