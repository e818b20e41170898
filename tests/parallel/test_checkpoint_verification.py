"""On resume the ranks of a group split the checksum work of ``CheckpointManager.latest``: each
hashes its share of a checkpoint's files, and one all-reduce makes every rank skip a checkpoint
that any rank found corrupt. Two real gloo processes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kdistill.trainer.checkpoint import MANIFEST, CheckpointManager
from tests.trainer.test_checkpoint import make_state, save, train_a_bit

from .harness import run_ranks


def _two_checkpoints(root: Path) -> tuple[Path, Path]:
    mgr = CheckpointManager(root, keep=3)
    model, aux, opt, sched = make_state(0)
    train_a_bit(model, aux, opt, sched, 1)
    older = save(mgr, 2, model, aux, opt, sched)
    train_a_bit(model, aux, opt, sched, 1)
    return older, save(mgr, 4, model, aux, opt, sched)


def _files(path: Path) -> list[str]:
    return sorted(json.loads((path / MANIFEST).read_text())["files"])


def test_each_rank_hashes_its_share_and_all_skip_what_one_found_corrupt(tmp_path: Path) -> None:
    older, newer = _two_checkpoints(tmp_path / "ckpt")
    names = _files(newer)
    # Corrupt a file of rank 1's share only: rank 0 alone would accept the newer checkpoint.
    bad = names[1::2][-1]
    (newer / bad).write_bytes(b"corrupt" + (newer / bad).read_bytes()[7:])
    run_ranks(2, "tests.parallel.verification_workers:latest_run", tmp_path, {"root": str(tmp_path / "ckpt")})
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["step"] for r in ranks] == [2, 2]
    # Rank 0 found its whole share of the newer checkpoint sound; rank 1 stopped at the bad file.
    assert [h for h in ranks[0]["hashed"] if h.startswith(newer.name)] == [f"{newer.name}/{n}" for n in names[0::2]]
    assert ranks[1]["hashed"][-1 - len(_files(older)[1::2])] == f"{newer.name}/{bad}"
    # The older checkpoint: every file hashed once, by one rank or the other.
    of_older = [h for r in ranks for h in r["hashed"] if h.startswith(older.name)]
    assert sorted(of_older) == [f"{older.name}/{n}" for n in _files(older)]


@pytest.mark.parametrize(
    "skew",
    [
        {"hide": {"1": 6}},  # rank 1 alone lists a checkpoint that landed after rank 0 listed
        {"hide": {"0": 6}},  # rank 0 alone lists it
        {"phantom": {"0": 8}},  # rank 0 lists a checkpoint pruned before rank 1 listed
    ],
    ids=["newer-on-rank-1", "newer-on-rank-0", "pruned-on-rank-1"],
)
def test_ranks_whose_listings_differ_resume_from_one_checkpoint(tmp_path: Path, skew: dict) -> None:
    """The ranks walk rank 0's listing: a checkpoint that rank 1 lacks is unsound for all, one that
    rank 0 lacks is not tried, and every rank makes the same collectives (none waits alone)."""
    root = tmp_path / "ckpt"
    _, newer = _two_checkpoints(root)
    shutil.copytree(newer, root / "step-000000006")  # a sound copy under a newer step
    run_ranks(2, "tests.parallel.verification_workers:latest_run", tmp_path, {"root": str(root), **skew})
    chosen = [json.loads((tmp_path / f"rank{r}.json").read_text())["path"] for r in range(2)]
    expected = newer.name if "0" in skew.get("hide", {}) else "step-000000006"
    assert chosen == [expected, expected]


def test_one_process_hashes_every_file(tmp_path: Path) -> None:
    older, newer = _two_checkpoints(tmp_path)
    assert CheckpointManager.verify(newer) is None
    (newer / _files(newer)[0]).write_bytes(b"x")
    assert CheckpointManager.verify(newer, (1, 2)) is None  # that file is not in share 1 of 2
    assert "does not match" in (CheckpointManager.verify(newer, (0, 2)) or "")
    info = CheckpointManager(tmp_path, keep=3).latest()
    assert info is not None and info.path == older
